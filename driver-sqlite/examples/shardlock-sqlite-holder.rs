//! Test helper process: takes keys in a lock directory, prints what it got,
//! then holds them until its input ends or it is killed. Used by the crash
//! test (contract clause 9) and the cross-process tests; the protocol is
//! `shardlock_contract_tests::holder`'s:
//!
//! ```text
//! SHARDLOCK_HOLDER_URL=<lock directory> shardlock-sqlite-holder [--wait] <database> <key-name>...
//! ```
//!
//! prints `GRANTED <0/1 per key>` once the batch is answered.

use shardlock_sqlite::SqliteDriver;

fn main() -> std::process::ExitCode {
    shardlock_contract_tests::holder::main(|dir| SqliteDriver::open(dir))
}
