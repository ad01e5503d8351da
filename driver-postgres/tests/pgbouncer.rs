//! Through a real PgBouncer (when `pgbouncer` is installed, e.g. `apt-get
//! install pgbouncer`): transaction pooling is refused at connect with
//! `PgError::TransactionPooling`; session pooling works.

mod common;

use std::error::Error as _;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{harness, PgHarness};
use shardlock_contract_tests::{unique_keys, unique_name, Harness};
use shardlock_core::{Driver, Error, NodeId, Session};
use shardlock_postgres::sqlx::postgres::{PgConnectOptions, PgConnection};
use shardlock_postgres::sqlx::{Connection, Executor};
use shardlock_postgres::{PgDriver, PgError, PgOptions};

/// A PgBouncer in front of the harness's server, stopped on drop.
struct Bouncer {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn find_pgbouncer() -> Option<PathBuf> {
    [
        "/usr/sbin/pgbouncer",
        "/usr/bin/pgbouncer",
        "/usr/local/bin/pgbouncer",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// `user`, `password` of a `postgres://user:password@host...` URL.
fn credentials(url: &str) -> (String, String) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let userinfo = rest.rsplit_once('@').map_or("", |(u, _)| u);
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    (user.to_string(), password.to_string())
}

impl Bouncer {
    async fn start(binary: &PathBuf, h: &PgHarness, pool_mode: &str) -> Bouncer {
        let o = h.options().get_connect_options();
        let (user, password) = credentials(h.url());
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let dir = std::env::temp_dir().join(unique_name("pgbouncer"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config = format!(
            "[databases]\n\
             {db} = host={host} port={server_port} user={user} password={password} dbname={db}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = any\n\
             pool_mode = {pool_mode}\n\
             server_round_robin = 1\n\
             default_pool_size = 4\n\
             logfile = {log}\n",
            db = h.database(),
            host = o.get_host(),
            server_port = o.get_port(),
            log = dir.join("pgbouncer.log").display(),
        );
        let ini = dir.join("pgbouncer.ini");
        std::fs::write(&ini, config).expect("config");
        let mut command = Command::new(binary);
        // PgBouncer refuses to run as root; let it drop to nobody.
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        if root {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
            command.args(["-u", "nobody"]);
        }
        let child = command
            .arg(&ini)
            .stdout(Stdio::null())
            // It logs to its logfile too (shown if it does not come up).
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        let url = format!("postgres://{user}@127.0.0.1:{port}/{}", h.database());
        let bouncer = Bouncer { child, dir, url };
        let started = Instant::now();
        while let Err(e) = bouncer.raw().await {
            if started.elapsed() > Duration::from_secs(10) {
                let log =
                    std::fs::read_to_string(bouncer.dir.join("pgbouncer.log")).unwrap_or_default();
                let tail = &log[log.len().saturating_sub(600)..];
                panic!(
                    "pgbouncer did not come up at {}: {e}; log: {tail}",
                    bouncer.url
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bouncer
    }

    /// A plain connection through PgBouncer. sqlx's default
    /// `extra_float_digits` startup parameter is left out: PgBouncer refuses
    /// it unless `ignore_startup_parameters` lists it.
    async fn raw(&self) -> Result<PgConnection, sqlx::Error> {
        let options: PgConnectOptions = self.url.parse()?;
        PgConnection::connect_with(&options.extra_float_digits(None)).await
    }

    /// Makes the pool hold two server connections, so consecutive
    /// transactions of one client land on different servers.
    async fn warm(&self) {
        let busy = || async move {
            let mut conn = self.raw().await.expect("through pgbouncer");
            // Simple protocol: a transaction pool loses prepared statements.
            let _ = conn.execute("SELECT pg_sleep(0.3)").await.expect("sleep");
            let _ = conn.close().await;
        };
        tokio::join!(busy(), busy());
    }

    fn driver(&self) -> PgDriver {
        PgDriver::new(PgOptions::parse(&self.url).expect("url"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_transaction_pooling_is_refused_session_pooling_works() {
    let Some(h) = harness().await else { return };
    let Some(binary) = find_pgbouncer() else {
        shardlock_contract_tests::skip(
            "postgres (pgbouncer)",
            "pgbouncer is not installed (apt-get install pgbouncer)",
            "PATH to include pgbouncer",
        );
        return;
    };
    let node = NodeId::new("through-pgbouncer");

    let transaction = Bouncer::start(&binary, &h, "transaction").await;
    transaction.warm().await;
    match transaction.driver().connect(&h.database(), &node).await {
        Err(err @ Error::Connect { .. }) => {
            let pg = err
                .source()
                .and_then(|s| s.downcast_ref::<PgError>())
                .unwrap_or_else(|| panic!("no PgError behind {err:?}"));
            assert!(matches!(pg, PgError::TransactionPooling { .. }), "{pg:?}");
            let text = pg.to_string();
            assert!(text.contains("transaction"), "{text}");
            eprintln!("refused: {text}");
        }
        Ok(session) => panic!(
            "connected through transaction pooling (backend {})",
            session.backend_pid()
        ),
        Err(other) => panic!("expected TransactionPooling, got {other:?}"),
    }
    drop(transaction);

    let session_mode = Bouncer::start(&binary, &h, "session").await;
    session_mode.warm().await;
    let driver = session_mode.driver();
    let mut a = driver
        .connect(&h.database(), &node)
        .await
        .expect("session mode");
    let mut b = h
        .driver()
        .connect(&h.database(), &node)
        .await
        .expect("direct");
    let keys = unique_keys("bouncer", 3);
    shardlock_contract_tests::take_all(&mut a, &keys).await;
    assert!(
        b.try_acquire(&keys)
            .await
            .expect("batch")
            .iter()
            .all(|g| !*g),
        "locks taken through a session pool exclude direct sessions"
    );
    a.verify().await.expect("verify");
    a.close().await.expect("close");
    shardlock_contract_tests::take_all(&mut b, &keys).await;
    b.close().await.expect("close");
}
