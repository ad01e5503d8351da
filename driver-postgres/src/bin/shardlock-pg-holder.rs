//! Takes shardlock keys in PostgreSQL and holds them until stdin closes or
//! the process is killed: the "other process" of the crash test (contract
//! clause 9), also handy to try takeover by hand.
//!
//! ```text
//! SHARDLOCK_PG_URL=postgres://user:pw@host/db shardlock-pg-holder [--wait] <database-id> <key-name>...
//! ```
//!
//! Prints `READY pid=<backend pid>` once every key is held, then waits. A
//! key held elsewhere is an error (exit status 2), unless `--wait` is given:
//! then it prints `WAITING pid=<backend pid>` and waits in the database for
//! each key in turn. On end of input it releases the keys and exits 0;
//! `kill -9` leaves the release to the server.

use std::io::{Read, Write};
use std::process::ExitCode;

use shardlock_core::{CancellationToken, DatabaseId, Driver, LockKey, NodeId, Session};
use shardlock_postgres::{PgDriver, PgOptions};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("shardlock-pg-holder: {message}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1).peekable();
    let wait = args.next_if(|a| a == "--wait").is_some();
    let database = args
        .next()
        .ok_or("usage: shardlock-pg-holder [--wait] <database-id> <key-name>...")?;
    let keys = args
        .map(LockKey::new)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let url = std::env::var("SHARDLOCK_PG_URL").map_err(|_| "set SHARDLOCK_PG_URL")?;
    let options = PgOptions::parse(&url).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let node = NodeId::new(format!("holder-{}", std::process::id()));
    let mut session = runtime.block_on(async {
        let driver = PgDriver::new(options);
        let mut session = driver
            .connect(&DatabaseId::new(database), &node)
            .await
            .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))?;
        if wait {
            println!("WAITING pid={}", session.backend_pid());
            let never = CancellationToken::new();
            for key in &keys {
                let _ = session
                    .acquire(key, &never)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        let granted = session
            .try_acquire(&keys)
            .await
            .map_err(|e| e.to_string())?;
        if granted.iter().all(|g| *g) {
            Ok(session)
        } else {
            Err(format!("keys held elsewhere: {granted:?}"))
        }
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY pid={}", session.backend_pid()).map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    drop(out);
    // Hold until the parent closes stdin (or kills this process).
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    runtime.block_on(async {
        let _ = session.release_all().await;
        session.close().await.map_err(|e| e.to_string())
    })
}
