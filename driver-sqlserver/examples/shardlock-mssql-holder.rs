//! Test helper process: opens a SQL Server session, takes keys, prints what
//! it got, then holds them until its input ends or it is killed. Used by the
//! crash test (contract clause 9), which kills it with SIGKILL; the protocol
//! is `shardlock_contract_tests::holder`'s:
//!
//! ```text
//! SHARDLOCK_HOLDER_URL=<connection string> shardlock-mssql-holder [--wait] <database> <key-name>...
//! ```
//!
//! prints `GRANTED <0/1 per key>` once the batch is answered.

use shardlock_sqlserver::{MssqlDriver, MssqlOptions};

fn main() -> std::process::ExitCode {
    shardlock_contract_tests::holder::main(|url| MssqlOptions::parse(url).map(MssqlDriver::new))
}
