//! Test helper process: takes keys in a lock directory, prints what it got,
//! then holds them until killed. Used by the crash and cross-process tests.
//!
//! Usage: `shardlock-sqlite-holder <dir> <database> <key-name>...`
//! Prints `GRANTED <0/1 per key>` once the batch is answered.

use std::io::Write;
use std::process::ExitCode;

use shardlock_core::{DatabaseId, Driver, LockKey, NodeId, Session};
use shardlock_sqlite::SqliteDriver;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: shardlock-sqlite-holder <dir> <database> <key-name>...");
        return ExitCode::from(2);
    }
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
        let driver = SqliteDriver::open(&args[0])?;
        let keys = args[2..]
            .iter()
            .map(LockKey::new)
            .collect::<Result<Vec<_>, _>>()?;
        let node = NodeId::new(format!("holder-{}", std::process::id()));
        let mut session = driver.connect(&DatabaseId::new(&args[1]), &node).await?;
        let granted = session.try_acquire(&keys).await?;
        let bits: String = granted.iter().map(|g| if *g { '1' } else { '0' }).collect();
        let mut out = std::io::stdout().lock();
        writeln!(out, "GRANTED {bits}")?;
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
