//! Fault injection against real `shardlock node` processes: three nodes,
//! twelve shards, random faults from a fixed seed, and a check, from the
//! nodes' own `--records`, that no shard ever ran on two nodes at once.
//!
//! Faults (Postgres: all but the MySQL `KILL`; MySQL/MariaDB: the same with
//! `KILL` for `pg_terminate_backend` and no held cut; SQLite: the first
//! three and its own):
//!
//! | kind | what |
//! |---|---|
//! | `kill -9` | SIGKILL a node, restart it (a new incarnation) |
//! | `SIGTERM` | graceful stop, restart |
//! | `SIGSTOP` | freeze a node longer than its lock-loss timeout, then SIGCONT |
//! | `pg_terminate_backend` | the server ends the node's sessions (found by `application_name = shardlock:<node>`) |
//! | `KILL <connection>` (MySQL) | the server ends the node's sessions, found in the processlist by their watchers' labelled wait (`/* shardlock:<node> session=<id> */`): half the time the session alone, half the time the watcher too |
//! | `server restart` | `docker restart` of the Postgres / MariaDB container |
//! | `network cut` | drop the node's existing TCP connections to the server on loopback, both directions, no RST (iptables, chain `SHARDLOCK_CHAOS_<pid>`), until the node has fenced itself, then heal |
//! | `network cut, held` | the same, held until another node runs one of its shards (the server freed the locks; not on MySQL, which frees them only after `wait_timeout`, 60 s) |
//!
//! Tests:
//!
//! - `faults_short_postgres`, `faults_short_sqlite`: 50 faults each at
//!   `--poll-ms 300`, a few minutes; fail on any overlap and print the table.
//! - `faults_short_mysql`: 30 faults at `--poll-ms 300` against MariaDB
//!   (about a minute); the same checks.
//! - `chaos_long` (a loud SKIPPED line unless `SHARDLOCK_CHAOS_LONG=1`;
//!   `scripts/chaos.sh` runs it): 300 faults per setting, writes
//!   `RELIABILITY.md`.
//! - `analysis_*`: the overlap / takeover / ownerless arithmetic on
//!   synthetic records (no server).
//!
//! Environment: `SHARDLOCK_CHAOS_SEED` replays a schedule (the seed is
//! printed at the start); `SHARDLOCK_CHAOS_FAULTS` overrides the number of
//! faults; `SHARDLOCK_CHAOS_KEEP=1` keeps the work folder (node logs and
//! records; it is always kept on failure); `SHARDLOCK_PG_URL` uses your
//! server (no server restart then); `SHARDLOCK_PG_IMAGE` the image
//! (default `shardlock-test/postgres:15`, run with host networking so a
//! network cut reaches the server without docker-proxy in between);
//! `SHARDLOCK_MYSQL_URL` / `SHARDLOCK_MYSQL_IMAGE` (default
//! `shardlock-test/mariadb:10.11`) the same for MySQL. Without a server a
//! run prints a `SKIPPED` line, and fails instead when `SHARDLOCK_REQUIRE`
//! names its database.
//!
//! Everything started here is undone on exit, on failure and on ctrl-c /
//! SIGTERM (a signal thread): nodes killed, the firewall chain flushed and
//! deleted, the container removed. Chains and containers left by a run that
//! was killed with SIGKILL are removed by the next run (and by
//! `scripts/chaos.sh`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shardlock::postgres::sqlx::{self, Connection};

#[path = "faults/mysql.rs"]
mod mysql;

const SHARDS: usize = 12;
const NODES: usize = 3;
const MS: u128 = 1_000_000;

// ---------------------------------------------------------------------------
// Small helpers

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn ms(ns: u128) -> f64 {
    ns as f64 / MS as f64
}

fn say(line: &str) {
    // Settings run in parallel (SHARDLOCK_CHAOS_PARALLEL) on threads named
    // `chaos-<setting>`.
    match std::thread::current().name() {
        Some(name) if name.starts_with("chaos-") => eprintln!("[{name}] {line}"),
        _ => eprintln!("[chaos] {line}"),
    }
}

/// A deterministic generator (SplitMix64): a seed replays the schedule.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo) + 1))
    }
}

fn seed() -> u64 {
    match std::env::var("SHARDLOCK_CHAOS_SEED") {
        Ok(s) if !s.trim().is_empty() => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("SHARDLOCK_CHAOS_SEED={s:?} is not a u64")),
        _ => (now_ns() as u64) ^ (u64::from(std::process::id()) << 32),
    }
}

/// Polls `cond` every 50 ms until it holds or `bound` passes.
fn wait_until(bound: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run_cmd(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn signal(pid: u32, sig: &str) -> Result<(), String> {
    run_cmd("kill", &["-s", sig, &pid.to_string()]).map(|_| ())
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

// ---------------------------------------------------------------------------
// Clean-up on every exit path, ctrl-c included

#[derive(Debug, Default)]
struct Cleanup {
    chains: BTreeSet<String>,
    containers: BTreeSet<String>,
    pids: BTreeSet<u32>,
}

fn cleanup() -> &'static Mutex<Cleanup> {
    static CLEANUP: OnceLock<Mutex<Cleanup>> = OnceLock::new();
    CLEANUP.get_or_init(|| {
        // A signal thread: ctrl-c, SIGTERM (nextest's timeout) or SIGHUP undo
        // everything this process set up, then exit.
        let spawned = std::thread::Builder::new()
            .name("chaos-signals".into())
            .spawn(|| {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async {
                    use tokio::signal::unix::{signal, SignalKind};
                    let (Ok(mut term), Ok(mut hup)) = (
                        signal(SignalKind::terminate()),
                        signal(SignalKind::hangup()),
                    ) else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                        _ = hup.recv() => {}
                    }
                    say("signal received: cleaning up (nodes, firewall chain, container)");
                    undo_all();
                    std::process::exit(130);
                });
            });
        if let Err(e) = spawned {
            say(&format!("cannot start the signal thread: {e}"));
        }
        Mutex::new(Cleanup::default())
    })
}

fn undo_all() {
    let mut c = cleanup().lock().unwrap_or_else(|p| p.into_inner());
    for pid in std::mem::take(&mut c.pids) {
        let _ = signal(pid, "CONT");
        let _ = signal(pid, "KILL");
    }
    for chain in std::mem::take(&mut c.chains) {
        remove_chain(&chain);
    }
    for id in std::mem::take(&mut c.containers) {
        let _ = run_cmd("docker", &["rm", "-f", &id]);
    }
}

// ---------------------------------------------------------------------------
// Firewall: a network cut without RST

const CHAIN_PREFIX: &str = "SHARDLOCK_CHAOS";

fn iptables(args: &[&str]) -> Result<String, String> {
    let mut all = vec!["-w"];
    all.extend_from_slice(args);
    run_cmd("iptables", &all)
}

fn remove_chain(chain: &str) {
    // Unhook (every copy), flush, delete; each step may fail harmlessly.
    for _ in 0..4 {
        if iptables(&["-D", "OUTPUT", "-d", "127.0.0.0/8", "-j", chain]).is_err() {
            break;
        }
    }
    let _ = iptables(&["-F", chain]);
    let _ = iptables(&["-X", chain]);
}

/// Removes chains of earlier runs whose process is gone.
fn remove_stale_chains() {
    let Ok(list) = iptables(&["-S"]) else { return };
    let mut stale = BTreeSet::new();
    for line in list.lines() {
        if let Some(name) = line.strip_prefix("-N ") {
            if let Some(pid) = name
                .strip_prefix(CHAIN_PREFIX)
                .and_then(|s| s.strip_prefix('_'))
                .and_then(|s| s.split('_').next())
                .and_then(|s| s.parse::<u32>().ok())
            {
                if !pid_alive(pid) {
                    stale.insert(name.to_string());
                }
            }
        }
    }
    for chain in stale {
        say(&format!("removing a stale firewall chain {chain}"));
        remove_chain(&chain);
    }
}

/// A dedicated chain hooked into OUTPUT for traffic to 127.0.0.0/8 (every
/// loopback packet passes OUTPUT once, so one chain sees both directions);
/// removed on drop.
#[derive(Debug)]
struct Firewall {
    chain: String,
}

impl Firewall {
    fn open() -> Result<Self, String> {
        if Command::new("iptables").arg("--version").output().is_err() {
            return Err("iptables is not installed (apt-get install -y iptables)".into());
        }
        remove_stale_chains();
        static CHAINS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = CHAINS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let chain = format!("{CHAIN_PREFIX}_{}_{n}", std::process::id());
        remove_chain(&chain);
        iptables(&["-N", &chain])?;
        cleanup()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .chains
            .insert(chain.clone());
        let fw = Self { chain };
        iptables(&["-I", "OUTPUT", "1", "-d", "127.0.0.0/8", "-j", &fw.chain])?;
        Ok(fw)
    }

    /// Drops every packet from or to these local ports (the node's side of
    /// its connections), so neither side sees a FIN or RST. One rule
    /// (`multiport --ports` matches source or destination), so both
    /// directions are cut at the same instant: with a rule per direction,
    /// server data sent between the two would be acked by nobody and keep
    /// the server retransmitting instead of probing with keepalives.
    fn cut(&self, ports: &[u16]) -> Result<(), String> {
        for chunk in ports.chunks(15) {
            let list: Vec<String> = chunk.iter().map(u16::to_string).collect();
            let list = list.join(",");
            iptables(&[
                "-A",
                &self.chain,
                "-p",
                "tcp",
                "-s",
                "127.0.0.0/8",
                "-d",
                "127.0.0.0/8",
                "-m",
                "multiport",
                "--ports",
                &list,
                "-j",
                "DROP",
            ])?;
        }
        Ok(())
    }

    fn heal(&self) -> Result<(), String> {
        iptables(&["-F", &self.chain]).map(|_| ())
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        remove_chain(&self.chain);
        cleanup()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .chains
            .remove(&self.chain);
    }
}

/// Local ports of `pid`'s established TCP connections to `server_port`.
fn connection_ports(pid: u32, server_port: u16) -> Vec<u16> {
    let Ok(out) = run_cmd("ss", &["-Htnp", "state", "established"]) else {
        return Vec::new();
    };
    let needle = format!("pid={pid},");
    let mut ports = Vec::new();
    for line in out.lines().filter(|l| l.contains(&needle)) {
        let addrs: Vec<&str> = line
            .split_whitespace()
            .filter(|t| t.contains(':') && !t.starts_with("users:"))
            .collect();
        let [local, peer, ..] = addrs[..] else {
            continue;
        };
        let port_of = |a: &str| a.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
        if port_of(peer) == Some(server_port) {
            if let Some(p) = port_of(local) {
                ports.push(p);
            }
        }
    }
    ports
}

// ---------------------------------------------------------------------------
// PostgreSQL: a container on the host network, or SHARDLOCK_PG_URL

/// A database server: Postgres or MySQL/MariaDB.
#[derive(Debug)]
struct Server {
    url: String,
    port: u16,
    container: Option<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(id) = self.container.take() {
            let _ = run_cmd("docker", &["rm", "-f", &id]);
            cleanup()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .containers
                .remove(&id);
        }
    }
}

fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    Ok(rt.block_on(f))
}

/// Runs one query returning one `bigint` on a fresh connection (10 s bound).
fn sql_i64(url: &str, query: &str, bind: Option<&str>) -> Result<i64, String> {
    block_on(async {
        let work = async {
            let mut conn = sqlx::postgres::PgConnection::connect(url)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let mut q = sqlx::query_scalar::<_, i64>(query);
            if let Some(b) = bind {
                q = q.bind(b.to_string());
            }
            let v = q.fetch_one(&mut conn).await.map_err(|e| format!("{e}"))?;
            let _ = conn.close().await;
            Ok::<i64, String>(v)
        };
        match tokio::time::timeout(Duration::from_secs(10), work).await {
            Ok(r) => r,
            Err(_) => Err("query timed out after 10 s".to_string()),
        }
    })?
}

fn pg_ready(url: &str, bound: Duration) -> bool {
    wait_until(bound, || sql_i64(url, "SELECT 1::bigint", None).is_ok())
}

fn pg_skip(why: &str) -> Option<Server> {
    eprintln!("SKIPPED: postgres (fault injection): {why}, set SHARDLOCK_PG_URL to run");
    if std::env::var("SHARDLOCK_REQUIRE").is_ok_and(|v| v.contains("postgres")) {
        panic!("postgres is required (SHARDLOCK_REQUIRE) but skipped: {why}");
    }
    None
}

fn free_port() -> u16 {
    for _ in 0..50 {
        if let Ok(l) = std::net::TcpListener::bind("127.0.0.1:0") {
            if let Ok(a) = l.local_addr() {
                let p = a.port();
                // Postgres also binds the unix socket `.s.PGSQL.<port>`
                // inside the container; any free TCP port will do.
                if p > 1024 {
                    return p;
                }
            }
        }
    }
    panic!("no free local port");
}

fn remove_stale_containers() {
    let Ok(list) = run_cmd(
        "docker",
        &[
            "ps",
            "-a",
            "--filter",
            "label=shardlock.test=chaos",
            "--format",
            "{{.ID}} {{.Label \"shardlock.chaos.pid\"}}",
        ],
    ) else {
        return;
    };
    for line in list.lines() {
        let mut parts = line.split_whitespace();
        let (Some(id), Some(pid)) = (parts.next(), parts.next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok_and(|p| !pid_alive(p)) {
            say(&format!("removing a stale chaos container {id}"));
            let _ = run_cmd("docker", &["rm", "-f", id]);
        }
    }
}

/// What differs between the fault run's servers; [`start_server`] does the
/// rest.
struct ServerKind {
    /// How logs name it.
    name: &'static str,
    /// A URL in this variable is used as it is.
    url_env: &'static str,
    /// The image to run, else `default_image`.
    image_env: &'static str,
    default_image: &'static str,
    /// The port of a URL that names none.
    default_port: u16,
    /// `docker run` arguments from the image on: the image and the
    /// server's own arguments for `port` (environment variables before it).
    run_args: fn(image: &str, port: u16) -> Vec<String>,
    /// The URL of a server started on `port`.
    url: fn(port: u16) -> String,
    ready: fn(&str, Duration) -> bool,
    skip: fn(&str) -> Option<Server>,
}

/// The server: the URL in `kind.url_env`, else a container of its image on
/// the host network (so a network cut reaches it without docker-proxy in
/// between), else a loud skip.
fn start_server(kind: &ServerKind) -> Option<Server> {
    if let Ok(url) = std::env::var(kind.url_env) {
        if !url.trim().is_empty() {
            let port = url
                .rsplit('@')
                .next()
                .and_then(|hp| hp.split('/').next())
                .and_then(|hp| hp.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(kind.default_port);
            if !(kind.ready)(&url, Duration::from_secs(30)) {
                panic!("{} is not reachable", kind.url_env);
            }
            return Some(Server {
                url,
                port,
                container: None,
            });
        }
    }
    let image = std::env::var(kind.image_env).unwrap_or_else(|_| kind.default_image.into());
    if let Err(e) = run_cmd("docker", &["image", "inspect", &image]) {
        return (kind.skip)(&format!("no Docker or no image {image} ({e})"));
    }
    remove_stale_containers();
    let port = free_port();
    let pid_label = format!("shardlock.chaos.pid={}", std::process::id());
    let mut args: Vec<String> = [
        "run",
        "-d",
        "--network",
        "host",
        "--label",
        "shardlock.test=chaos",
        "--label",
        &pid_label,
    ]
    .map(String::from)
    .into();
    args.extend((kind.run_args)(&image, port));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let id = match run_cmd("docker", &args) {
        Ok(id) => id,
        Err(e) => return (kind.skip)(&format!("cannot start {image} on the host network: {e}")),
    };
    cleanup()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .containers
        .insert(id.clone());
    let server = Server {
        url: (kind.url)(port),
        port,
        container: Some(id),
    };
    if !(kind.ready)(&server.url, Duration::from_secs(90)) {
        panic!(
            "the {} container on 127.0.0.1:{port} did not become ready in 90 s",
            kind.name
        );
    }
    let short_id: String = server
        .container
        .as_deref()
        .unwrap_or("")
        .chars()
        .take(12)
        .collect();
    say(&format!(
        "{} {image} on 127.0.0.1:{port} (host network, container {short_id})",
        kind.name
    ));
    Some(server)
}

fn pg_server() -> Option<Server> {
    start_server(&ServerKind {
        name: "Postgres",
        url_env: "SHARDLOCK_PG_URL",
        image_env: "SHARDLOCK_PG_IMAGE",
        default_image: "shardlock-test/postgres:15",
        default_port: 5432,
        run_args: |image, port| {
            let port = format!("port={port}");
            [
                "-e",
                "POSTGRES_PASSWORD=postgres",
                image,
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                &port,
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ]
            .map(String::from)
            .into()
        },
        url: |port| format!("postgres://postgres:postgres@127.0.0.1:{port}/postgres"),
        ready: pg_ready,
        skip: pg_skip,
    })
}

// ---------------------------------------------------------------------------
// Records (the nodes' own; see cli/src/records.rs)

/// One agent run on one node incarnation.
#[derive(Debug, Clone, PartialEq)]
struct Run {
    node: String,
    shard: String,
    start: u128,
    cancel: Option<u128>,
    stop: Option<u128>,
    /// `stop`, else the moment the process was known dead.
    end: Option<u128>,
}

/// A node's timings, from its `config` record.
#[derive(Debug, Clone, Default)]
struct NodeConfig {
    fields: BTreeMap<String, String>,
}

impl NodeConfig {
    fn ms(&self, key: &str) -> Option<u64> {
        self.fields.get(key).and_then(|v| v.parse().ok())
    }
}

fn parse_records(node: &str, text: &str, runs: &mut Vec<Run>) -> NodeConfig {
    let mut open: BTreeMap<String, usize> = BTreeMap::new();
    let mut config = NodeConfig::default();
    for line in text.lines() {
        let mut parts = line.split(' ');
        let (Some(event), Some(shard), Some(ns)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Ok(ns) = ns.parse::<u128>() else { continue };
        match event {
            "start" => {
                open.insert(shard.to_string(), runs.len());
                runs.push(Run {
                    node: node.to_string(),
                    shard: shard.to_string(),
                    start: ns,
                    cancel: None,
                    stop: None,
                    end: None,
                });
            }
            "cancel" => {
                if let Some(&i) = open.get(shard) {
                    runs[i].cancel.get_or_insert(ns);
                }
            }
            "stop" => {
                if let Some(i) = open.remove(shard) {
                    runs[i].stop = Some(ns);
                    runs[i].end = Some(ns);
                }
            }
            "config" => {
                for kv in parts {
                    if let Some((k, v)) = kv.split_once('=') {
                        config.fields.insert(k.to_string(), v.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    config
}

/// Every node's runs; runs of dead nodes without a `stop` end at the death.
fn read_runs(
    dir: &Path,
    deaths: &BTreeMap<String, u128>,
) -> (Vec<Run>, BTreeMap<String, NodeConfig>) {
    let mut runs = Vec::new();
    let mut configs = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (runs, configs);
    };
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    for path in files {
        let Some(node) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let config = parse_records(&node, &text, &mut runs);
        configs.insert(node, config);
    }
    for run in runs.iter_mut().filter(|r| r.end.is_none()) {
        if let Some(&at) = deaths.get(&run.node) {
            run.end = Some(at.max(run.start));
        }
    }
    (runs, configs)
}

// ---------------------------------------------------------------------------
// Analysis

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Kill,
    Term,
    Stop,
    Terminate,
    KillConn,
    Unlink,
    Restart,
    Cut,
    CutHeld,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Kill => "kill -9",
            Kind::Term => "SIGTERM (graceful)",
            Kind::Stop => "SIGSTOP > loss timeout",
            Kind::Terminate => "pg_terminate_backend",
            Kind::KillConn => "KILL <connection> (MySQL)",
            Kind::Unlink => "session file deleted (SQLite)",
            Kind::Restart => "server restart",
            Kind::Cut => "network cut",
            Kind::CutHeld => "network cut, held",
        }
    }
}

/// One injected fault.
#[derive(Debug, Clone)]
struct Fault {
    kind: Kind,
    target: Option<String>,
    /// When the fault hit (after the signal / statement / rule went in).
    at: u128,
    /// Runs open on the target(s) when it hit: `(node, shard, start)`.
    affected: Vec<(String, String, u128)>,
    /// Something worth reading (no connection found, a bound passed...).
    note: Option<String>,
    /// Counted in the table (false when the fault could not be injected).
    counted: bool,
}

#[derive(Debug, Clone)]
struct Overlap {
    shard: String,
    a: Run,
    b: Run,
    from: u128,
    to: u128,
    fault: Option<usize>,
}

#[derive(Debug, Default, Clone)]
struct KindStats {
    faults: usize,
    affected: usize,
    /// Fault → the old run's end (its agent stopped or the process died), ms.
    stopped: Vec<f64>,
    /// Fault → the next run of the shard started (any node), ms.
    takeover: Vec<f64>,
    /// Runs that went on through the fault (the lock was never lost).
    kept: usize,
    /// Shards with no later run before the end.
    no_takeover: usize,
    overlaps: usize,
    max_ownerless: f64,
    notes: usize,
}

#[derive(Debug, Default)]
struct Analysis {
    overlaps: Vec<Overlap>,
    kinds: BTreeMap<Kind, KindStats>,
    max_ownerless: f64,
    max_ownerless_at: Option<(String, Option<Kind>)>,
    unattributed_ownerless: f64,
}

fn latest_fault_before(faults: &[Fault], t: u128) -> Option<usize> {
    faults
        .iter()
        .enumerate()
        .filter(|(_, f)| f.at <= t)
        .max_by_key(|(_, f)| f.at)
        .map(|(i, _)| i)
}

fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let idx = ((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1);
    Some(v[idx])
}

fn analyse(runs: &[Run], faults: &[Fault], warm: u128, end: u128) -> Analysis {
    let mut a = Analysis::default();
    let mut by_shard: BTreeMap<&str, Vec<&Run>> = BTreeMap::new();
    for r in runs {
        by_shard.entry(r.shard.as_str()).or_default().push(r);
    }
    for list in by_shard.values_mut() {
        list.sort_by_key(|r| r.start);
    }
    // Overlaps: two incarnations running one shard at one instant.
    for (shard, list) in &by_shard {
        for (i, x) in list.iter().enumerate() {
            for y in &list[i + 1..] {
                if x.node == y.node {
                    continue;
                }
                let x_end = x.end.unwrap_or(u128::MAX);
                let y_end = y.end.unwrap_or(u128::MAX);
                if x.start < y_end && y.start < x_end {
                    let from = x.start.max(y.start);
                    a.overlaps.push(Overlap {
                        shard: shard.to_string(),
                        a: (*x).clone(),
                        b: (*y).clone(),
                        from,
                        to: x_end.min(y_end),
                        fault: latest_fault_before(faults, from),
                    });
                }
            }
        }
    }
    for o in &a.overlaps {
        if let Some(i) = o.fault {
            a.kinds.entry(faults[i].kind).or_default().overlaps += 1;
        }
    }
    // Per fault: how fast the old runs stopped and the shards moved. A run
    // still going when the next fault hit went through this one (kept).
    for (i, f) in faults.iter().enumerate().filter(|(_, f)| f.counted) {
        let horizon = faults.get(i + 1).map_or(end, |n| n.at);
        let s = a.kinds.entry(f.kind).or_default();
        s.faults += 1;
        if f.note.is_some() {
            s.notes += 1;
        }
        for (node, shard, start) in &f.affected {
            s.affected += 1;
            let Some(list) = by_shard.get(shard.as_str()) else {
                continue;
            };
            let Some(old) = list.iter().find(|r| &r.node == node && r.start == *start) else {
                continue;
            };
            let next = list
                .iter()
                .filter(|r| r.start >= f.at && !(r.node == old.node && r.start == old.start))
                .map(|r| r.start)
                .min();
            match old.end {
                Some(e) if e <= horizon && next.is_none_or(|n| e <= n) && e >= f.at => {
                    s.stopped.push(ms(e - f.at));
                    match next {
                        Some(n) => s.takeover.push(ms(n - f.at)),
                        None => s.no_takeover += 1,
                    }
                }
                Some(e) if e < f.at => s.stopped.push(0.0),
                _ => s.kept += 1,
            }
        }
    }
    // Ownerless stretches after the warm-up, charged to the latest fault.
    for list in by_shard.values() {
        let mut covered_to = warm;
        let mut intervals: Vec<(u128, u128)> = list
            .iter()
            .map(|r| (r.start, r.end.unwrap_or(u128::MAX)))
            .collect();
        intervals.sort();
        let mut gaps = Vec::new();
        for (s, e) in intervals {
            if s > covered_to && s > warm {
                gaps.push((covered_to, s.min(end)));
            }
            covered_to = covered_to.max(e);
        }
        if covered_to < end {
            gaps.push((covered_to, end));
        }
        for (g0, g1) in gaps {
            if g1 <= g0 || g0 >= end {
                continue;
            }
            let len = ms(g1 - g0);
            let kind = latest_fault_before(faults, g0).map(|i| faults[i].kind);
            match kind {
                Some(k) => {
                    let s = a.kinds.entry(k).or_default();
                    s.max_ownerless = s.max_ownerless.max(len);
                }
                None => a.unattributed_ownerless = a.unattributed_ownerless.max(len),
            }
            if len > a.max_ownerless {
                a.max_ownerless = len;
                a.max_ownerless_at = Some((list[0].shard.clone(), kind));
            }
        }
    }
    a
}

fn fmt_ms(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if x >= 10_000.0 => format!("{:.1} s", x / 1000.0),
        Some(x) if x >= 100.0 => format!("{x:.0} ms"),
        Some(x) => format!("{x:.1} ms"),
    }
}

/// The table, as Markdown (also readable on a terminal).
fn table(a: &Analysis) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| fault | faults | shard runs hit | overlaps | old run stopped p50 / max | takeover p50 / max | kept (lock not lost) | no new owner | max ownerless |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---|---|---:|---:|---|");
    let mut total = KindStats::default();
    for (kind, s) in &a.kinds {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} / {} | {} / {} | {} | {} | {} |",
            kind.label(),
            s.faults,
            s.affected,
            s.overlaps,
            fmt_ms(percentile(&s.stopped, 0.5)),
            fmt_ms(percentile(&s.stopped, 1.0)),
            fmt_ms(percentile(&s.takeover, 0.5)),
            fmt_ms(percentile(&s.takeover, 1.0)),
            s.kept,
            s.no_takeover,
            fmt_ms(Some(s.max_ownerless)),
        );
        total.faults += s.faults;
        total.affected += s.affected;
        total.overlaps += s.overlaps;
        total.kept += s.kept;
        total.no_takeover += s.no_takeover;
    }
    let _ = writeln!(
        out,
        "| **all** | **{}** | {} | **{}** | | | {} | {} | **{}** |",
        total.faults,
        total.affected,
        a.overlaps.len(),
        total.kept,
        total.no_takeover,
        fmt_ms(Some(a.max_ownerless)),
    );
    out
}

// ---------------------------------------------------------------------------
// The run

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Postgres,
    Sqlite,
    MySql,
}

#[derive(Debug, Clone)]
struct Setting {
    name: String,
    backend: Backend,
    /// Extra `shardlock node` flags (`--poll-ms 300`, ...).
    node_args: Vec<String>,
    faults: usize,
    /// Random pause between faults, after the cluster settled, ms.
    gap_ms: (u64, u64),
    /// Fault kinds and their weights.
    weights: Vec<(Kind, u64)>,
    /// Every n-th network cut is held until the server frees the locks
    /// (0: none is).
    held_every: usize,
    /// Longest wait for the cluster to settle before the next fault.
    max_settle: Duration,
}

impl Setting {
    fn new(name: &str, backend: Backend, node_args: &[&str], faults: usize) -> Self {
        Self {
            name: name.into(),
            backend,
            node_args: node_args.iter().map(|s| s.to_string()).collect(),
            faults,
            gap_ms: (200, 800),
            weights: match backend {
                // The server ending sessions is the case under repair: most
                // weight; slow kinds (SIGSTOP, cuts) less.
                Backend::Postgres => vec![
                    (Kind::Kill, 4),
                    (Kind::Term, 3),
                    (Kind::Stop, 1),
                    (Kind::Terminate, 6),
                    (Kind::Restart, 1),
                    (Kind::Cut, 2),
                ],
                Backend::Sqlite => vec![
                    (Kind::Kill, 4),
                    (Kind::Term, 3),
                    (Kind::Stop, 1),
                    (Kind::Unlink, 5),
                ],
                Backend::MySql => vec![
                    (Kind::Kill, 4),
                    (Kind::Term, 3),
                    (Kind::Stop, 1),
                    (Kind::KillConn, 6),
                    (Kind::Restart, 1),
                    (Kind::Cut, 2),
                ],
            },
            // MySQL frees a cut-off node's locks only after the session's
            // wait_timeout (60 s): no held cuts there.
            held_every: if backend == Backend::MySql { 0 } else { 6 },
            max_settle: Duration::from_secs(30),
        }
    }

    /// One held cut only (the first), for runs that must stay short.
    fn short(mut self) -> Self {
        if self.held_every != 0 {
            self.held_every = usize::MAX;
        }
        self
    }

    fn command_line(&self) -> String {
        let driver = match self.backend {
            Backend::Postgres => "--driver postgres --url <server>",
            Backend::Sqlite => "--driver sqlite --dir <tmp>",
            Backend::MySql => "--driver mysql --url <server>",
        };
        let extra = if self.node_args.is_empty() {
            "(default timings)".to_string()
        } else {
            self.node_args.join(" ")
        };
        format!("shardlock node {driver} --shards {SHARDS} {extra}")
    }
}

#[derive(Debug)]
enum NodeState {
    Running,
    Frozen,
    Dead,
}

#[derive(Debug)]
struct Node {
    id: String,
    child: Child,
    stdin: Option<ChildStdin>,
    state: NodeState,
}

impl Node {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Outcome of one setting.
#[derive(Debug)]
struct Outcome {
    setting: Setting,
    seed: u64,
    analysis: Analysis,
    faults: Vec<Fault>,
    duration: Duration,
    notes: Vec<String>,
    unsettled: usize,
    timings: String,
    skipped_kinds: Vec<String>,
    unexpected_exits: usize,
    work: PathBuf,
}

struct Chaos {
    setting: Setting,
    rng: Rng,
    work: PathBuf,
    records: PathBuf,
    bin: PathBuf,
    server: Option<Server>,
    firewall: Option<Firewall>,
    nodes: Vec<Node>,
    incarnations: usize,
    deaths: BTreeMap<String, u128>,
    faults: Vec<Fault>,
    notes: Vec<String>,
    unexpected_exits: usize,
    cuts: usize,
    unsettled: usize,
    // timings read from the first node's config record
    poll: Duration,
    loss_timeout: Duration,
    stop_timeout: Duration,
}

impl Chaos {
    fn note(&mut self, line: String) {
        say(&line);
        self.notes.push(line);
    }

    /// The server's URL (empty for SQLite).
    fn server_url(&self) -> String {
        self.server
            .as_ref()
            .map(|p| p.url.clone())
            .unwrap_or_default()
    }

    /// Waits until the server answers a query again, up to `bound`.
    fn server_ready(&self, bound: Duration) -> bool {
        let url = self.server_url();
        match self.setting.backend {
            Backend::Postgres => pg_ready(&url, bound),
            Backend::MySql => mysql::ready(&url, bound),
            Backend::Sqlite => true,
        }
    }

    fn spawn(&mut self, slot: usize) {
        self.incarnations += 1;
        let id = format!("n{}-{}", slot + 1, self.incarnations);
        let mut args: Vec<String> = vec!["node".into()];
        match self.setting.backend {
            Backend::Postgres => {
                let url = self.server_url();
                args.extend(["--driver".into(), "postgres".into(), "--url".into(), url]);
            }
            Backend::MySql => {
                let url = self.server_url();
                args.extend(["--driver".into(), "mysql".into(), "--url".into(), url]);
            }
            Backend::Sqlite => {
                args.extend([
                    "--driver".into(),
                    "sqlite".into(),
                    "--dir".into(),
                    self.work.join("locks").display().to_string(),
                ]);
            }
        }
        args.extend([
            "--shards".into(),
            SHARDS.to_string(),
            "--node-id".into(),
            id.clone(),
            "--records".into(),
            self.records.display().to_string(),
            "--stop-on-stdin-eof".into(),
        ]);
        args.extend(self.setting.node_args.iter().cloned());
        let log_path = self.work.join("logs").join(format!("{id}.log"));
        let log = std::fs::File::create(&log_path).expect("node log file");
        let mut child = Command::new(&self.bin)
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("SHARDLOCK_CHAOS_NODE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn shardlock node");
        cleanup()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pids
            .insert(child.id());
        let stdin = child.stdin.take();
        let node = Node {
            id,
            child,
            stdin,
            state: NodeState::Running,
        };
        if slot < self.nodes.len() {
            self.nodes[slot] = node;
        } else {
            self.nodes.push(node);
        }
    }

    fn mark_dead(&mut self, slot: usize, at: u128) {
        let node = &mut self.nodes[slot];
        node.state = NodeState::Dead;
        node.stdin = None;
        self.deaths.insert(node.id.clone(), at);
        cleanup()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pids
            .remove(&node.child.id());
    }

    /// Notices nodes that exited by themselves, and restarts them.
    fn reap_unexpected(&mut self) {
        for slot in 0..self.nodes.len() {
            if !matches!(
                self.nodes[slot].state,
                NodeState::Running | NodeState::Frozen
            ) {
                continue;
            }
            if let Ok(Some(status)) = self.nodes[slot].child.try_wait() {
                let at = now_ns();
                let id = self.nodes[slot].id.clone();
                self.unexpected_exits += 1;
                self.mark_dead(slot, at);
                let tail =
                    std::fs::read_to_string(self.work.join("logs").join(format!("{id}.log")))
                        .unwrap_or_default()
                        .lines()
                        .rev()
                        .take(5)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join(" | ");
                self.note(format!(
                    "node {id} exited by itself ({status}); last log lines: {tail}"
                ));
                self.spawn(slot);
            }
        }
    }

    fn runs(&self) -> Vec<Run> {
        read_runs(&self.records, &self.deaths).0
    }

    fn open_runs_of(&self, node: &str) -> Vec<(String, String, u128)> {
        self.runs()
            .into_iter()
            .filter(|r| r.node == node && r.end.is_none())
            .map(|r| (r.node, r.shard, r.start))
            .collect()
    }

    /// Every shard runs on exactly one live node, and every slot is alive.
    fn settled(&mut self) -> bool {
        self.reap_unexpected();
        let runs = self.runs();
        let mut owners: BTreeMap<&str, usize> = BTreeMap::new();
        for r in runs.iter().filter(|r| r.end.is_none()) {
            *owners.entry(r.shard.as_str()).or_default() += 1;
        }
        owners.len() == SHARDS && owners.values().all(|&n| n == 1)
    }

    fn wait_settled(&mut self, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        loop {
            if self.settled() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn pick_target(&mut self) -> usize {
        let runs = self.runs();
        let busy: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| matches!(self.nodes[i].state, NodeState::Running))
            .filter(|&i| {
                runs.iter()
                    .any(|r| r.node == self.nodes[i].id && r.end.is_none())
            })
            .collect();
        if !busy.is_empty() {
            return busy[self.rng.below(busy.len() as u64) as usize];
        }
        let live: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| matches!(self.nodes[i].state, NodeState::Running))
            .collect();
        if live.is_empty() {
            0
        } else {
            live[self.rng.below(live.len() as u64) as usize]
        }
    }

    fn kinds(&self) -> Vec<(Kind, u64)> {
        let restart = self.server.as_ref().is_some_and(|p| p.container.is_some());
        let cut = self.firewall.is_some();
        self.setting
            .weights
            .iter()
            .copied()
            .filter(|(k, _)| match k {
                Kind::Restart => restart,
                Kind::Cut | Kind::CutHeld => cut,
                _ => true,
            })
            .collect()
    }

    fn pick_kind(&mut self) -> Kind {
        let kinds = self.kinds();
        let total: u64 = kinds.iter().map(|(_, w)| w).sum();
        let mut x = self.rng.below(total);
        let mut kind = Kind::Kill;
        for (k, w) in kinds {
            if x < w {
                kind = k;
                break;
            }
            x -= w;
        }
        if kind == Kind::Cut {
            let every = self.setting.held_every;
            if every != 0 && self.cuts.is_multiple_of(every) {
                kind = Kind::CutHeld;
            }
            self.cuts += 1;
        }
        kind
    }

    fn inject(&mut self, kind: Kind) -> Fault {
        let slot = self.pick_target();
        let target = self.nodes[slot].id.clone();
        let pid = self.nodes[slot].pid();
        let affected = self.open_runs_of(&target);
        let mut fault = Fault {
            kind,
            target: Some(target.clone()),
            at: 0,
            affected,
            note: None,
            counted: true,
        };
        match kind {
            Kind::Kill => {
                let _ = self.nodes[slot].child.kill();
                fault.at = now_ns();
                self.mark_dead(slot, fault.at);
                let _ = self.nodes[slot].child.wait();
                std::thread::sleep(self.rng.millis(200, 1000));
                self.spawn(slot);
            }
            Kind::Term => {
                if let Err(e) = signal(pid, "TERM") {
                    fault.note = Some(e);
                }
                fault.at = now_ns();
                let bound = self.stop_timeout + self.loss_timeout + Duration::from_secs(5);
                let child = &mut self.nodes[slot].child;
                let exited = wait_until(bound, || matches!(child.try_wait(), Ok(Some(_))));
                if !exited {
                    let _ = child.kill();
                    let _ = child.wait();
                    fault.note = Some(format!(
                        "{target} did not exit within {bound:?} of SIGTERM; killed"
                    ));
                }
                let at = now_ns();
                self.mark_dead(slot, at);
                std::thread::sleep(self.rng.millis(200, 1000));
                self.spawn(slot);
            }
            Kind::Stop => {
                let hold = self.loss_timeout + self.rng.millis(300, 2000);
                if let Err(e) = signal(pid, "STOP") {
                    fault.note = Some(e);
                }
                fault.at = now_ns();
                self.nodes[slot].state = NodeState::Frozen;
                std::thread::sleep(hold);
                let _ = signal(pid, "CONT");
                self.nodes[slot].state = NodeState::Running;
                // Let the thawed node react (its deadlines passed while it
                // was frozen) before the cluster counts as settled.
                std::thread::sleep(self.poll + Duration::from_millis(500));
            }
            Kind::Terminate => {
                let url = self.server_url();
                // Half the time the sessions alone, half the time every
                // backend of the node (a side connection cancelling a wait
                // too, if one is open).
                let all = self.rng.below(2) == 0;
                let app = format!("shardlock:{target}");
                let filter = if all {
                    "application_name = $1 OR application_name LIKE $1 || ':%'"
                } else {
                    "application_name = $1"
                };
                // The server's clock (the same host's) right after the
                // terminations were sent: the moment the sessions ended.
                let query = format!(
                    "SELECT CASE WHEN n = 0 THEN 0 ELSE \
                     (extract(epoch FROM clock_timestamp()) * 1000000)::bigint END \
                     FROM (SELECT count(pg_terminate_backend(pid)) AS n \
                     FROM pg_stat_activity WHERE {filter}) t"
                );
                let before = now_ns();
                match sql_i64(&url, &query, Some(&app)) {
                    Ok(0) => {
                        fault.note = Some(format!("no backend of {target} to terminate"));
                        fault.at = before;
                        fault.counted = false;
                    }
                    Ok(us) => fault.at = (us as u128) * 1000,
                    Err(e) => {
                        fault.note = Some(format!("pg_terminate_backend failed: {e}"));
                        fault.at = before;
                    }
                }
            }
            Kind::KillConn => {
                // Half the time the session alone (its watcher must notice),
                // half the time the watcher too.
                let all = self.rng.below(2) == 0;
                let before = now_ns();
                match mysql::kill_sessions(&self.server_url(), &target, all) {
                    Ok(0) => {
                        fault.note = Some(format!("no session of {target} to KILL"));
                        fault.at = before;
                        fault.counted = false;
                    }
                    Ok(_) => fault.at = before,
                    Err(e) => {
                        // Not injected: counted against the run's share.
                        fault.note = Some(format!("KILL failed: {e}"));
                        fault.at = before;
                        fault.counted = false;
                    }
                }
            }
            Kind::Unlink => {
                // The SQLite driver's "server ends the session": delete the
                // session's liveness file `<dir>/main/sessions/<node>-<pid>-*.lock`.
                let dir = self.work.join("locks").join("main").join("sessions");
                let prefix = format!("{target}-{pid}-");
                let files: Vec<PathBuf> = std::fs::read_dir(&dir)
                    .map(|rd| {
                        rd.filter_map(|e| e.ok().map(|e| e.path()))
                            .filter(|p| {
                                p.file_name()
                                    .and_then(|n| n.to_str())
                                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".lock"))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let mut removed = 0;
                for f in &files {
                    if std::fs::remove_file(f).is_ok() {
                        removed += 1;
                    }
                }
                fault.at = now_ns();
                if removed == 0 {
                    fault.counted = false;
                    fault.note = Some(format!("no session file of {target} in {}", dir.display()));
                }
            }
            Kind::Restart => {
                fault.target = None;
                fault.affected = self
                    .runs()
                    .into_iter()
                    .filter(|r| r.end.is_none())
                    .map(|r| (r.node, r.shard, r.start))
                    .collect();
                let id = self
                    .server
                    .as_ref()
                    .and_then(|p| p.container.clone())
                    .unwrap_or_default();
                fault.at = now_ns();
                if let Err(e) = run_cmd("docker", &["restart", "-t", "10", &id]) {
                    fault.note = Some(format!("docker restart failed: {e}"));
                }
                if !self.server_ready(Duration::from_secs(60)) {
                    panic!("the server did not come back within 60 s of a restart");
                }
            }
            Kind::Cut | Kind::CutHeld => {
                let server_port = self.server.as_ref().map_or(0, |p| p.port);
                let ports = connection_ports(pid, server_port);
                if ports.is_empty() {
                    fault.note = Some(format!("{target} had no connection to cut"));
                    fault.counted = false;
                    fault.at = now_ns();
                    return fault;
                }
                let cut = self.firewall.as_ref().map(|fw| fw.cut(&ports));
                if let Some(Err(e)) = cut {
                    let _ = self.firewall.as_ref().map(Firewall::heal);
                    panic!("iptables failed: {e}");
                }
                fault.at = now_ns();
                // Runs open right after the cut went in.
                fault.affected = self.open_runs_of(&target);
                let fence_bound =
                    self.poll + self.loss_timeout + self.stop_timeout + Duration::from_secs(5);
                let affected = fault.affected.clone();
                let records = self.records.clone();
                let deaths = self.deaths.clone();
                let fenced = wait_until(fence_bound, || {
                    let runs = read_runs(&records, &deaths).0;
                    affected.iter().all(|(n, s, st)| {
                        runs.iter().any(|r| {
                            &r.node == n && &r.shard == s && r.start == *st && r.end.is_some()
                        })
                    })
                });
                if !fenced {
                    fault.note = Some(format!(
                        "{target} had not stopped its agents {fence_bound:?} after the cut"
                    ));
                }
                if kind == Kind::CutHeld && !affected.is_empty() {
                    // Hold until the server frees the locks and one of the
                    // shards runs again: on another node, or on the cut node
                    // itself through a new connection (the cut only drops
                    // the connections that existed when it began).
                    let bound = Duration::from_secs(60);
                    let at = fault.at;
                    let moved = wait_until(bound, || {
                        let runs = read_runs(&records, &deaths).0;
                        affected
                            .iter()
                            .any(|(_, s, _)| runs.iter().any(|r| &r.shard == s && r.start >= at))
                    });
                    if !moved {
                        fault.note = Some(format!(
                            "none of {target}'s shards ran again within {bound:?} of the cut"
                        ));
                    }
                }
                if let Some(fw) = &self.firewall {
                    if let Err(e) = fw.heal() {
                        panic!("cannot remove the cut: {e}");
                    }
                }
            }
        }
        fault
    }

    fn stop_all(&mut self) {
        for node in &mut self.nodes {
            if matches!(node.state, NodeState::Frozen) {
                let _ = signal(node.pid(), "CONT");
            }
            node.stdin = None; // --stop-on-stdin-eof: graceful stop
        }
        let bound = self.stop_timeout + self.loss_timeout + Duration::from_secs(10);
        for slot in 0..self.nodes.len() {
            if matches!(self.nodes[slot].state, NodeState::Dead) {
                continue;
            }
            let child = &mut self.nodes[slot].child;
            let exited = wait_until(bound, || matches!(child.try_wait(), Ok(Some(_))));
            if !exited {
                let _ = child.kill();
                let _ = child.wait();
                let id = self.nodes[slot].id.clone();
                self.note(format!(
                    "{id} did not stop within {bound:?} at the end; killed"
                ));
            }
            self.mark_dead(slot, now_ns());
        }
    }
}

impl Drop for Chaos {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if !matches!(node.state, NodeState::Dead) {
                let _ = signal(node.pid(), "CONT");
                let _ = node.child.kill();
                let _ = node.child.wait();
            }
        }
    }
}

fn run_setting(setting: Setting, seed: u64) -> Option<Outcome> {
    let _ = cleanup(); // the signal thread
    let server = match setting.backend {
        Backend::Postgres => Some(pg_server()?),
        Backend::MySql => Some(mysql::server()?),
        Backend::Sqlite => None,
    };
    let mut skipped_kinds = Vec::new();
    let firewall = match setting.backend {
        Backend::Sqlite => None,
        Backend::Postgres | Backend::MySql => {
            let local = server
                .as_ref()
                .is_some_and(|p| p.url.contains("@127.") || p.url.contains("@localhost"));
            if !local {
                skipped_kinds.push("network cut (the server is not on this host)".to_string());
                None
            } else {
                match Firewall::open() {
                    Ok(fw) => Some(fw),
                    Err(e) => {
                        eprintln!(
                            "SKIPPED: network-cut faults: {e}; install iptables and run as root"
                        );
                        skipped_kinds.push(format!("network cut ({e})"));
                        None
                    }
                }
            }
        }
    };
    if server.as_ref().is_some_and(|p| p.container.is_none()) {
        skipped_kinds.push("server restart (a server of your own: no container to restart)".into());
    }
    let work = std::env::temp_dir().join(format!(
        "shardlock-chaos-{}-{}",
        std::process::id(),
        setting.name
    ));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("logs")).expect("work folder");
    std::fs::create_dir_all(work.join("locks")).expect("lock folder");
    let records = work.join("records");
    // A private copy of the binary: a rebuild of the tree during a long run
    // must not change (or break) the nodes started later.
    let bin = work.join("shardlock");
    std::fs::copy(env!("CARGO_BIN_EXE_shardlock"), &bin).expect("copy the shardlock binary");
    say(&format!(
        "setting {}: {} faults, seed {seed} (replay: SHARDLOCK_CHAOS_SEED={seed}), work folder {}",
        setting.name,
        setting.faults,
        work.display()
    ));
    let mut chaos = Chaos {
        rng: Rng(seed),
        setting: setting.clone(),
        work: work.clone(),
        records,
        bin,
        server,
        firewall,
        nodes: Vec::new(),
        incarnations: 0,
        deaths: BTreeMap::new(),
        faults: Vec::new(),
        notes: Vec::new(),
        unexpected_exits: 0,
        cuts: 0,
        unsettled: 0,
        poll: Duration::from_secs(5),
        loss_timeout: Duration::from_secs(5),
        stop_timeout: Duration::from_secs(5),
    };
    let started = Instant::now();
    for slot in 0..NODES {
        chaos.spawn(slot);
    }
    assert!(
        chaos.wait_settled(Duration::from_secs(60)),
        "the {} shards were not all running within 60 s of the start (see {})",
        SHARDS,
        work.display()
    );
    let (_, configs) = read_runs(&chaos.records, &chaos.deaths);
    let config = configs.values().next().cloned().unwrap_or_default();
    if let Some(v) = config.ms("poll_ms") {
        chaos.poll = Duration::from_millis(v);
    }
    if let Some(v) = config.ms("loss_timeout_ms") {
        chaos.loss_timeout = Duration::from_millis(v);
    }
    if let Some(v) = config.ms("stop_timeout_ms") {
        chaos.stop_timeout = Duration::from_millis(v);
    }
    let takeover_delay_ms = config.ms("takeover_delay_ms");
    let timings = format!(
        "poll {} ms, lock-loss timeout {} ms, stop timeout {} ms, takeover delay {}",
        chaos.poll.as_millis(),
        chaos.loss_timeout.as_millis(),
        chaos.stop_timeout.as_millis(),
        takeover_delay_ms.map_or("?".to_string(), |d| format!("{d} ms")),
    );
    say(&format!("{}: {timings}", setting.name));
    let warm = now_ns();
    let settle_bound =
        (chaos.poll * 2 + chaos.loss_timeout + Duration::from_secs(2)).min(setting.max_settle);
    for i in 0..setting.faults {
        if !chaos.wait_settled(settle_bound) {
            chaos.unsettled += 1;
            say(&format!(
                "fault {}: not settled within {settle_bound:?} (injecting anyway)",
                i + 1
            ));
        }
        let gap = chaos.rng.millis(setting.gap_ms.0, setting.gap_ms.1);
        std::thread::sleep(gap);
        let kind = chaos.pick_kind();
        let fault = chaos.inject(kind);
        say(&format!(
            "fault {:>3}/{}: {:<24} {:<6} {} runs hit{}",
            i + 1,
            setting.faults,
            kind.label(),
            fault.target.clone().unwrap_or_else(|| "all".into()),
            fault.affected.len(),
            fault
                .note
                .as_ref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        ));
        if let Some(n) = &fault.note {
            chaos
                .notes
                .push(format!("fault {} ({}): {n}", i + 1, kind.label()));
        }
        chaos.faults.push(fault);
    }
    let final_bound = chaos.poll * 2 + chaos.loss_timeout + Duration::from_secs(5);
    if !chaos.wait_settled(final_bound) {
        chaos.note(format!(
            "not settled within {final_bound:?} after the last fault"
        ));
    }
    std::thread::sleep(chaos.poll.min(Duration::from_secs(2)));
    let end = now_ns();
    chaos.stop_all();
    let (runs, _) = read_runs(&chaos.records, &chaos.deaths);
    let analysis = analyse(&runs, &chaos.faults, warm, end);
    Some(Outcome {
        setting,
        seed,
        faults: chaos.faults.clone(),
        analysis,
        duration: started.elapsed(),
        notes: chaos.notes.clone(),
        unsettled: chaos.unsettled,
        timings,
        skipped_kinds,
        unexpected_exits: chaos.unexpected_exits,
        work,
    })
}

fn describe_overlaps(o: &Outcome) -> String {
    let mut out = String::new();
    for ov in &o.analysis.overlaps {
        let fault = ov.fault.map(|i| {
            let f = &o.faults[i];
            format!(
                "fault #{} {} on {} at {}",
                i + 1,
                f.kind.label(),
                f.target.clone().unwrap_or_else(|| "all".into()),
                f.at
            )
        });
        let _ = writeln!(
            out,
            "OVERLAP {}: {} [{} .. {:?} cancel {:?}] and {} [{} .. {:?} cancel {:?}], together {:.1} ms from {} (after {})",
            ov.shard,
            ov.a.node,
            ov.a.start,
            ov.a.end,
            ov.a.cancel,
            ov.b.node,
            ov.b.start,
            ov.b.end,
            ov.b.cancel,
            if ov.to == u128::MAX { f64::INFINITY } else { ms(ov.to - ov.from) },
            ov.from,
            fault.unwrap_or_else(|| "no fault".into()),
        );
    }
    out
}

fn summary(o: &Outcome) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "setting `{}` ({}): {} faults in {:.0} s, seed {}; {}",
        o.setting.name,
        o.setting.command_line(),
        o.faults.iter().filter(|f| f.counted).count(),
        o.duration.as_secs_f64(),
        o.seed,
        o.timings
    );
    out.push('\n');
    out.push_str(&table(&o.analysis));
    let _ = writeln!(
        out,
        "\noverlaps: {}; max ownerless: {} (shard {}); nodes that exited by themselves: {}; faults injected before the cluster settled: {}",
        o.analysis.overlaps.len(),
        fmt_ms(Some(o.analysis.max_ownerless)),
        o.analysis
            .max_ownerless_at
            .as_ref()
            .map_or("-".to_string(), |(s, k)| format!(
                "{s}, after {}",
                k.map_or("no fault", |k| k.label())
            )),
        o.unexpected_exits,
        o.unsettled
    );
    for s in &o.skipped_kinds {
        let _ = writeln!(out, "skipped fault kind: {s}");
    }
    out
}

fn finish(o: &Outcome) {
    eprintln!("\n{}", summary(o));
    for n in &o.notes {
        eprintln!("note: {n}");
    }
    let overlaps = describe_overlaps(o);
    if !overlaps.is_empty() {
        eprintln!("{overlaps}");
    }
    let keep = std::env::var("SHARDLOCK_CHAOS_KEEP").is_ok_and(|v| v != "0");
    if overlaps.is_empty() && o.unexpected_exits == 0 && !keep {
        let _ = std::fs::remove_dir_all(&o.work);
    } else {
        eprintln!("work folder kept: {}", o.work.display());
    }
}

fn faults_from_env(default: usize) -> usize {
    std::env::var("SHARDLOCK_CHAOS_FAULTS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn short(setting: Setting) {
    let seed = seed();
    eprintln!("chaos seed: {seed} (replay with SHARDLOCK_CHAOS_SEED={seed})");
    let Some(o) = run_setting(setting, seed) else {
        return;
    };
    finish(&o);
    assert!(
        o.analysis.overlaps.is_empty(),
        "{} overlap(s): a shard ran on two nodes at once (seed {seed}):\n{}",
        o.analysis.overlaps.len(),
        describe_overlaps(&o)
    );
    assert_eq!(
        o.unexpected_exits, 0,
        "nodes exited by themselves (seed {seed}); see the notes above"
    );
    let counted = o.faults.iter().filter(|f| f.counted).count();
    assert!(
        counted * 10 >= o.faults.len() * 9,
        "only {counted} of {} faults could be injected",
        o.faults.len()
    );
}

/// 50 faults on Postgres at `--poll-ms 300`: kill -9, SIGTERM, SIGSTOP,
/// pg_terminate_backend, server restart, network cuts.
#[test]
fn faults_short_postgres() {
    short(
        Setting::new(
            "postgres-poll300",
            Backend::Postgres,
            &["--poll-ms", "300"],
            faults_from_env(50),
        )
        .short(),
    );
}

/// 30 faults on MySQL/MariaDB at `--poll-ms 300`: kill -9, SIGTERM,
/// SIGSTOP, `KILL` of the node's connections, server restart, network cuts
/// (none held: the server would keep the locks for its 60 s
/// `wait_timeout`).
#[test]
fn faults_short_mysql() {
    short(
        Setting::new(
            "mysql-poll300",
            Backend::MySql,
            &["--poll-ms", "300"],
            faults_from_env(30),
        )
        .short(),
    );
}

/// 50 faults on SQLite at `--poll-ms 300`: kill -9, SIGTERM, SIGSTOP.
#[test]
fn faults_short_sqlite() {
    short(
        Setting::new(
            "sqlite-poll300",
            Backend::Sqlite,
            &["--poll-ms", "300"],
            faults_from_env(50),
        )
        .short(),
    );
}

fn utc_date(secs: u64) -> String {
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let days = (secs / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// The long run (`scripts/chaos.sh`): 300 faults per setting, a report in
/// `SHARDLOCK_CHAOS_REPORT` (Markdown). Settings: `SHARDLOCK_CHAOS_SETTINGS`
/// (comma separated; default `postgres-default,postgres-poll300,sqlite-poll300`).
#[test]
fn chaos_long() {
    if std::env::var_os("SHARDLOCK_CHAOS_LONG").is_none() {
        eprintln!(
            "SKIPPED: chaos_long: the long run (300 faults per setting, about 40 minutes), \
             set SHARDLOCK_CHAOS_LONG=1 to run (scripts/chaos.sh does)"
        );
        return;
    }
    let base = seed();
    eprintln!("chaos seed: {base} (replay with SHARDLOCK_CHAOS_SEED={base})");
    let faults = faults_from_env(300);
    let names = std::env::var("SHARDLOCK_CHAOS_SETTINGS")
        .unwrap_or_else(|_| "postgres-default,postgres-poll300,sqlite-poll300".into());
    let parallel = std::env::var("SHARDLOCK_CHAOS_PARALLEL").is_ok_and(|v| v == "1");
    let mut settings = Vec::new();
    for (i, name) in names
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .enumerate()
    {
        let setting = match name {
            "postgres-default" => {
                let mut s = Setting::new(name, Backend::Postgres, &[], faults);
                // A 5 s poll: do not wait a whole takeover before every fault.
                s.max_settle = Duration::from_secs(4);
                s
            }
            "postgres-poll300" => {
                Setting::new(name, Backend::Postgres, &["--poll-ms", "300"], faults)
            }
            "sqlite-default" => Setting::new(name, Backend::Sqlite, &[], faults),
            "mysql-poll300" => Setting::new(name, Backend::MySql, &["--poll-ms", "300"], faults),
            "sqlite-poll300" => Setting::new(name, Backend::Sqlite, &["--poll-ms", "300"], faults),
            other => panic!("unknown setting {other:?}"),
        };
        settings.push((setting, base.wrapping_add(i as u64)));
    }
    let mut outcomes = Vec::new();
    let mut failures = Vec::new();
    if parallel {
        // Each setting on its own thread: its own server, chain and nodes.
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = settings
                .iter()
                .cloned()
                .map(|(setting, seed)| {
                    let name = setting.name.clone();
                    let handle = std::thread::Builder::new()
                        .name(format!("chaos-{name}"))
                        .spawn_scoped(scope, move || run_setting(setting, seed))
                        .expect("spawn a setting thread");
                    (name, handle)
                })
                .collect();
            handles
                .into_iter()
                .map(|(name, h)| (name, h.join()))
                .collect()
        });
        for (name, result) in results {
            match result {
                Ok(Some(o)) => outcomes.push(o),
                Ok(None) => eprintln!("setting {name} skipped"),
                Err(_) => failures.push(name),
            }
        }
    } else {
        for (setting, seed) in settings {
            let name = setting.name.clone();
            match std::panic::catch_unwind(move || run_setting(setting, seed)) {
                Ok(Some(o)) => outcomes.push(o),
                Ok(None) => eprintln!("setting {name} skipped"),
                Err(_) => failures.push(name),
            }
        }
    }
    for o in &outcomes {
        finish(o);
    }
    let total_overlaps: usize = outcomes.iter().map(|o| o.analysis.overlaps.len()).sum();
    if let Ok(path) = std::env::var("SHARDLOCK_CHAOS_REPORT") {
        let report = reliability_md(&outcomes, base);
        std::fs::write(&path, report).unwrap_or_else(|e| panic!("writing {path}: {e}"));
        eprintln!("report written to {path}");
    }
    assert!(failures.is_empty(), "settings that failed: {failures:?}");
    assert_eq!(total_overlaps, 0, "overlaps found; see the report");
}

fn reliability_md(outcomes: &[Outcome], base: u64) -> String {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let date = env("SHARDLOCK_CHAOS_DATE").unwrap_or_else(|| {
        utc_date(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        )
    });
    let commit = env("SHARDLOCK_CHAOS_COMMIT").unwrap_or_else(|| {
        run_cmd("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_else(|_| "?".into())
    });
    let command = env("SHARDLOCK_CHAOS_COMMAND").unwrap_or_else(|| "scripts/chaos.sh".into());
    let mut out = String::new();
    let total_faults: usize = outcomes
        .iter()
        .map(|o| o.faults.iter().filter(|f| f.counted).count())
        .sum();
    let total_overlaps: usize = outcomes.iter().map(|o| o.analysis.overlaps.len()).sum();
    let _ = writeln!(out, "# Reliability: fault injection\n");
    let _ = writeln!(
        out,
        "Generated by `scripts/chaos.sh` (the `chaos_long` test of `cli/tests/faults.rs`); \
         do not edit by hand.\n"
    );
    let _ = writeln!(out, "- date: {date}");
    let _ = writeln!(
        out,
        "- commit: `{commit}`{}",
        if env("SHARDLOCK_CHAOS_DIRTY").is_some() {
            " (with uncommitted changes in the tree)"
        } else {
            ""
        }
    );
    let _ = writeln!(out, "- command: `{command}`");
    if std::env::var("SHARDLOCK_CHAOS_PARALLEL").is_ok_and(|v| v == "1") {
        let _ = writeln!(
            out,
            "- the settings ran at the same time (`--parallel`), each with its own nodes, \
             server container and firewall chain, on the same 2-core host"
        );
    }
    let _ = writeln!(out, "- seed: `{base}` (setting *i* uses seed + *i*; replay with `SHARDLOCK_CHAOS_SEED={base} {command}`)");
    let _ = writeln!(
        out,
        "- machine: {} CPUs, one host (nodes, harness and the server container share it)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let _ = writeln!(
        out,
        "- result: **{total_faults} faults, {total_overlaps} overlaps**\n"
    );
    let _ = writeln!(out, "## What is measured\n");
    let _ = writeln!(
        out,
        "Three real `shardlock node` processes share {SHARDS} shards (`single-tenant`, one lock per shard). \
         A harness injects random faults from a fixed seed, one at a time: after each fault it waits (bounded) \
         until every shard runs on exactly one node again, then pauses 200–800 ms. Killed and stopped nodes \
         restart as a new incarnation (a new node id) 200–1000 ms later. \
         Everything below is computed from the nodes' own `--records` (a `start`, `cancel` and `stop` line with a \
         nanosecond timestamp for every agent run; a SIGKILLed node's open runs end at the kill), on one host's clock.\n"
    );
    let _ = writeln!(out, "- **overlaps**: two incarnations running one shard at the same instant (zero tolerance). A frozen (SIGSTOPped) node's runs count as running.");
    let _ = writeln!(out, "- **old run stopped**: fault → the hit run ended (its agent returned, or the process died). For a network cut this is the self-fencing time.");
    let _ = writeln!(out, "- **takeover**: fault → the next run of that shard started (on any node, the same node's new session included).");
    let _ = writeln!(out, "- **kept**: runs that went on through the fault because the lock was never lost (SIGSTOP: the kernel keeps the frozen process's sockets and file locks).");
    let _ = writeln!(out, "- **max ownerless**: the longest stretch a shard ran nowhere, charged to the latest fault before it.\n");
    let _ = writeln!(out, "Faults: `kill -9` (SIGKILL, restart); `SIGTERM` (graceful stop, restart); `SIGSTOP` longer than the lock-loss timeout, then SIGCONT; `pg_terminate_backend` of the node's sessions (found by `application_name`); `KILL <connection>` on MySQL/MariaDB (the node's sessions found in the processlist by their watchers' labelled waits; half the time the watchers too); `server restart` (`docker restart` of the container); `network cut`: the node's existing TCP connections to the server dropped on loopback in both directions with iptables (no FIN, no RST reaches either side) until the node has stopped its agents, then healed; `network cut, held`: the same, held until another node runs one of the node's shards, i.e. until the server noticed the dead connection and freed the locks.\n");
    for o in outcomes {
        let _ = writeln!(out, "## `{}`\n", o.setting.name);
        let _ = writeln!(
            out,
            "`{}` — {}; {} faults in {:.0} s, seed `{}`.\n",
            o.setting.command_line(),
            o.timings,
            o.faults.iter().filter(|f| f.counted).count(),
            o.duration.as_secs_f64(),
            o.seed
        );
        out.push_str(&table(&o.analysis));
        out.push('\n');
        let _ = writeln!(
            out,
            "Overlaps: **{}**. Max ownerless: {}. Nodes that exited by themselves: {}. \
             Faults injected before the cluster had settled (bound {}): {}.",
            o.analysis.overlaps.len(),
            fmt_ms(Some(o.analysis.max_ownerless)),
            o.unexpected_exits,
            fmt_ms(Some(o.setting.max_settle.as_millis() as f64)),
            o.unsettled
        );
        for s in &o.skipped_kinds {
            let _ = writeln!(out, "\nSkipped fault kind: {s}.");
        }
        let overlaps = describe_overlaps(o);
        if !overlaps.is_empty() {
            let _ = writeln!(out, "\n```text\n{overlaps}```");
        }
        if !o.notes.is_empty() {
            let _ = writeln!(out, "\nNotes ({}):\n", o.notes.len());
            for n in o.notes.iter().take(30) {
                let _ = writeln!(out, "- {n}");
            }
            if o.notes.len() > 30 {
                let _ = writeln!(out, "- … {} more", o.notes.len() - 30);
            }
        }
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------
// The arithmetic, on synthetic records

fn run(node: &str, shard: &str, start: u128, end: Option<u128>) -> Run {
    Run {
        node: node.into(),
        shard: shard.into(),
        start,
        cancel: end,
        stop: end,
        end,
    }
}

#[test]
fn analysis_finds_overlaps_and_charges_them_to_the_fault() {
    let runs = vec![
        run("a", "s1", 0, Some(100 * MS)),
        run("b", "s1", 90 * MS, None), // 10 ms together with a
        run("a", "s2", 0, Some(50 * MS)),
        run("b", "s2", 50 * MS, None), // touching is not overlapping
    ];
    let faults = vec![Fault {
        kind: Kind::Terminate,
        target: Some("a".into()),
        at: 40 * MS,
        affected: vec![("a".into(), "s1".into(), 0), ("a".into(), "s2".into(), 0)],
        note: None,
        counted: true,
    }];
    let a = analyse(&runs, &faults, 0, 200 * MS);
    assert_eq!(a.overlaps.len(), 1, "{:?}", a.overlaps);
    assert_eq!(a.overlaps[0].shard, "s1");
    assert_eq!(a.overlaps[0].to - a.overlaps[0].from, 10 * MS);
    let s = &a.kinds[&Kind::Terminate];
    assert_eq!(s.overlaps, 1);
    assert_eq!(s.affected, 2);
    // s1's old run outlived the next start: not a clean stop.
    assert_eq!(s.kept, 1);
    assert_eq!(s.stopped, vec![10.0]);
    assert_eq!(s.takeover, vec![10.0]);
}

#[test]
fn analysis_measures_takeover_and_ownerless_time() {
    let runs = vec![
        run("a", "s1", 0, Some(100 * MS)),
        run("b", "s1", 400 * MS, None),
        run("c", "s2", 0, None), // frozen through the fault: kept
    ];
    let faults = vec![
        Fault {
            kind: Kind::Kill,
            target: Some("a".into()),
            at: 100 * MS,
            affected: vec![("a".into(), "s1".into(), 0)],
            note: None,
            counted: true,
        },
        Fault {
            kind: Kind::Stop,
            target: Some("c".into()),
            at: 500 * MS,
            affected: vec![("c".into(), "s2".into(), 0)],
            note: None,
            counted: true,
        },
    ];
    let a = analyse(&runs, &faults, 0, 1000 * MS);
    assert!(a.overlaps.is_empty());
    let kill = &a.kinds[&Kind::Kill];
    assert_eq!(kill.takeover, vec![300.0]);
    assert_eq!(kill.stopped, vec![0.0]);
    assert_eq!(kill.max_ownerless, 300.0);
    assert_eq!(a.kinds[&Kind::Stop].kept, 1);
    assert_eq!(a.max_ownerless, 300.0);
    let t = table(&a);
    assert!(t.contains("| kill -9 | 1 | 1 | 0 |"), "{t}");
}

#[test]
fn records_parse_with_fields_and_deaths() {
    let mut runs = Vec::new();
    let cfg = parse_records(
        "n1-1",
        "config - 1 pid=7 poll_ms=300 takeover_delay_ms=100\nstart s1 10 epoch=1\ncancel s1 20\nstop s1 25\nstart s2 30 epoch=1\nstart s3",
        &mut runs,
    );
    assert_eq!(cfg.ms("poll_ms"), Some(300));
    assert_eq!(cfg.ms("takeover_delay_ms"), Some(100));
    assert_eq!(runs.len(), 2);
    assert_eq!((runs[0].cancel, runs[0].end), (Some(20), Some(25)));
    assert_eq!(runs[1].end, None);
    assert_eq!(utc_date(0), "1970-01-01 00:00 UTC");
    assert_eq!(utc_date(1_709_251_200), "2024-03-01 00:00 UTC");
}
