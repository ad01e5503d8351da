//! Test helper process: takes keys in MySQL/MariaDB, prints what it got,
//! then holds them until its input ends or it is killed. Used by the crash
//! test (contract clause 9); the protocol is
//! `shardlock_contract_tests::holder`'s:
//!
//! ```text
//! SHARDLOCK_HOLDER_URL=mysql://user:pw@host/db shardlock-mysql-holder [--wait] <database> <key-name>...
//! ```

use shardlock_mysql::{MySqlDriver, MySqlOptions};

fn main() -> std::process::ExitCode {
    shardlock_contract_tests::holder::main(|url| MySqlOptions::parse(url).map(MySqlDriver::new))
}
