//! Test helper process for release hints across processes: takes keys in a
//! lock directory, then gives them back with an **announced** release when
//! told to.
//!
//! ```text
//! shardlock-sqlite-announcer <lock directory> <database> <clean bits> <key-name>...
//! ```
//!
//! - Opens one session on `<database>` and takes every key in one batch;
//!   prints `GRANTED <0/1 per key>`.
//! - Waits for one line on its standard input, then calls
//!   `release_announced` for every key, `<clean bits>` (one `0`/`1` per key,
//!   e.g. `10`) saying which were handed over cleanly; prints
//!   `RELEASED <0/1 per key>`.
//! - Then closes the session and exits 0 (1 on a database error, 2 on a
//!   usage error, with the reason on standard error).

use std::io::{BufRead, Write};
use std::process::ExitCode;

use shardlock_core::{DatabaseId, Driver, LockKey, NodeId, Session};
use shardlock_sqlite::SqliteDriver;

type BoxError = Box<dyn std::error::Error>;

fn bits(values: &[bool]) -> String {
    values.iter().map(|v| if *v { '1' } else { '0' }).collect()
}

fn say(line: &str) -> Result<(), BoxError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

fn run(
    dir: String,
    database: String,
    clean: Vec<bool>,
    keys: Vec<LockKey>,
) -> Result<(), BoxError> {
    let driver = SqliteDriver::open(dir)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let node = NodeId::new(format!("announcer-{}", std::process::id()));
        let mut session = driver.connect(&DatabaseId::new(database), &node).await?;
        let granted = session.try_acquire(&keys).await?;
        say(&format!("GRANTED {}", bits(&granted)))?;
        let mut line = String::new();
        tokio::task::spawn_blocking(move || std::io::stdin().lock().read_line(&mut line)).await??;
        let released = session.release_announced(&keys, &clean).await?;
        say(&format!("RELEASED {}", bits(&released)))?;
        session.close().await?;
        Ok(())
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || {
        eprintln!(
            "usage: shardlock-sqlite-announcer <lock directory> <database> <clean bits> <key-name>..."
        );
        ExitCode::from(2)
    };
    let [dir, database, clean, names @ ..] = args.as_slice() else {
        return usage();
    };
    if names.is_empty() || clean.chars().any(|c| c != '0' && c != '1') {
        return usage();
    }
    let clean: Vec<bool> = clean.chars().map(|c| c == '1').collect();
    let keys = match names
        .iter()
        .map(LockKey::new)
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(keys) => keys,
        Err(e) => {
            eprintln!("shardlock-sqlite-announcer: {e}");
            return usage();
        }
    };
    match run(dir.clone(), database.clone(), clean, keys) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shardlock-sqlite-announcer: failed: {e}");
            ExitCode::FAILURE
        }
    }
}
