//! Test helper process: takes keys in PostgreSQL, prints what it got, then
//! holds them until its input ends or it is killed. Used by the crash test
//! (contract clause 9) and the killed-waiter test (`--wait`); the protocol
//! is `shardlock_contract_tests::holder`'s:
//!
//! ```text
//! SHARDLOCK_HOLDER_URL=postgres://user:pw@host/db shardlock-pg-holder [--wait] <database> <key-name>...
//! ```
//!
//! prints `GRANTED <0/1 per key>` once the batch is answered (after
//! `WAITING` and a wait for each key with `--wait`).

use shardlock_postgres::{PgDriver, PgOptions};

fn main() -> std::process::ExitCode {
    shardlock_contract_tests::holder::main(|url| PgOptions::parse(url).map(PgDriver::new))
}
