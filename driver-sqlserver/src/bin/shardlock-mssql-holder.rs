//! Test helper process: opens a SQL Server session, takes keys, prints what it
//! got, then holds them until killed. Used by the crash test (contract clause
//! 9), which kills it with SIGKILL.
//!
//! Usage: `shardlock-mssql-holder <database> <key-name>...`, with the
//! connection string in the environment variable `SHARDLOCK_MSSQL_HOLDER_URL`
//! (not an argument, so the password does not show in the process list).
//! Prints `GRANTED <0/1 per key> <spid>` once the batch is answered.

use std::io::Write;
use std::process::ExitCode;

use shardlock_core::{DatabaseId, Driver, LockKey, NodeId, Session};
use shardlock_sqlserver::{MssqlDriver, MssqlOptions};

const URL_VAR: &str = "SHARDLOCK_MSSQL_HOLDER_URL";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!(
            "usage: {URL_VAR}=<connection string> shardlock-mssql-holder <database> <key-name>..."
        );
        return ExitCode::from(2);
    }
    let Ok(url) = std::env::var(URL_VAR) else {
        eprintln!("set {URL_VAR} to the connection string");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), Box<dyn std::error::Error>> = runtime.block_on(async {
        let driver = MssqlDriver::new(url.parse::<MssqlOptions>()?);
        let keys = args[1..]
            .iter()
            .map(LockKey::new)
            .collect::<Result<Vec<_>, _>>()?;
        let node = NodeId::new(format!("holder-{}", std::process::id()));
        let mut session = driver.connect(&DatabaseId::new(&args[0]), &node).await?;
        let granted = session.try_acquire(&keys).await?;
        let bits: String = granted.iter().map(|g| if *g { '1' } else { '0' }).collect();
        let mut out = std::io::stdout().lock();
        writeln!(out, "GRANTED {bits} {}", session.spid())?;
        out.flush()?;
        drop(out);
        // Hold until killed.
        std::future::pending::<()>().await;
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("holder failed: {e}");
            ExitCode::FAILURE
        }
    }
}
