//! Connect failures that need no SQL Server: a closed port, a peer that does
//! not speak TDS, a peer that never answers. Only loopback addresses.

use std::time::{Duration, Instant};

use shardlock_contract_tests::holder;
use shardlock_core::{DatabaseId, Driver, Error, ErrorKind, NodeId};
use shardlock_sqlserver::{MssqlDriver, MssqlError, MssqlOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn options(port: u16) -> MssqlOptions {
    MssqlOptions::parse(&format!(
        "Server=tcp:127.0.0.1,{port};User Id=sa;Password=x;TrustServerCertificate=true"
    ))
    .expect("valid")
}

/// A loopback port nobody listens on.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    port
}

#[tokio::test]
async fn a_closed_port_is_unreachable() {
    let port = closed_port().await;
    let driver = MssqlDriver::new(options(port));
    let e = driver
        .open_session(&DatabaseId::new("main"), &NodeId::new("n"))
        .await
        .expect_err("nothing listens");
    eprintln!("closed port: {e}: {:?}", std::error::Error::source(&e));
    assert!(matches!(e, MssqlError::Unreachable { .. }), "{e:?}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    // Through the Driver trait it is Error::Connect with the typed source.
    match driver
        .connect(&DatabaseId::new("main"), &NodeId::new("n"))
        .await
    {
        Err(err @ Error::Connect { .. }) => {
            let source = std::error::Error::source(&err).expect("source");
            assert!(source.downcast_ref::<MssqlError>().is_some());
            // A refused connection: retry with backoff, nothing to fix in
            // the configuration.
            assert_eq!(err.kind(), ErrorKind::SessionFatal, "{err:?}");
        }
        other => panic!("expected Error::Connect, got {other:?}"),
    }
}

#[tokio::test]
async fn a_peer_that_is_not_sql_server_fails_the_handshake() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        // Two connections at most: plenty for one connect attempt.
        for _ in 0..2 {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 512];
            let _ = socket.read(&mut buf).await;
            let _ = socket
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
            let _ = socket.shutdown().await;
        }
    });
    let driver = MssqlDriver::new(options(port).connect_timeout(Duration::from_secs(10)));
    let e = driver
        .open_session(&DatabaseId::new("main"), &NodeId::new("n"))
        .await
        .expect_err("not a TDS server");
    eprintln!("not TDS: {e}: {:?}", std::error::Error::source(&e));
    assert!(
        matches!(e, MssqlError::Handshake { .. }),
        "expected a handshake error, got {e:?}"
    );
    assert!(e.to_string().contains("is it a SQL Server"), "{e}");
    server.abort();
}

#[tokio::test]
async fn a_silent_peer_hits_the_connect_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket); // accept, never answer
        }
    });
    let timeout = Duration::from_millis(300);
    let driver = MssqlDriver::new(options(port).connect_timeout(timeout));
    let started = Instant::now();
    let e = driver
        .open_session(&DatabaseId::new("main"), &NodeId::new("n"))
        .await
        .expect_err("never answers");
    assert!(matches!(e, MssqlError::ConnectTimeout { .. }), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    server.abort();
}

#[test]
fn the_release_window_is_the_server_keepalive() {
    let driver = MssqlDriver::new(options(1433));
    assert_eq!(driver.name(), "sqlserver");
    assert_eq!(driver.lock_release_window(), Some(Duration::from_secs(30)));
    let driver = MssqlDriver::new(options(1433).server_keepalive(None));
    assert_eq!(driver.lock_release_window(), None);
}

/// The holder process reports a connect failure and exits 1 (the crash
/// test's helper, checked without a server); a usage error exits 2.
#[tokio::test]
async fn the_holder_process_fails_cleanly_without_a_server() {
    let port = closed_port().await;
    let program = holder::example("shardlock-mssql-holder");
    let run = move |url: Option<String>| {
        let mut command = std::process::Command::new(&program);
        command
            .args(["main", "some-key"])
            .env_remove(holder::URL_ENV);
        if let Some(url) = url {
            command.env(holder::URL_ENV, url);
        }
        command
            .output()
            .expect("run the holder (built by cargo test as an example)")
    };
    let url = format!("Server=tcp:127.0.0.1,{port};User Id=sa;Password=x");
    let (output, run) = tokio::task::spawn_blocking(move || (run(Some(url)), run))
        .await
        .expect("join");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(output.stdout.is_empty(), "no GRANTED line");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("holder failed"), "{stderr}");
    // Without the variable it explains itself.
    let output = run(None);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(holder::URL_ENV), "{stderr}");
}
