//! Benchmarks of [shardlock](https://docs.rs/shardlock) against raw
//! baselines: the same lock operations done directly on a connection of the
//! same kind (sqlx on one `PgConnection` or `MySqlConnection`, rusqlite on
//! a key file, a `Mutex<HashMap>`), measured side by side in the same run.
//!
//! This crate is not published. It holds what the criterion benches
//! (`benches/micro.rs`) and the latency harness (`shardlock-bench`) share:
//! the raw baselines, the PostgreSQL bench environment (server-side statement
//! counts from `pg_stat_statements`, connections per node from
//! `pg_stat_activity`), the MySQL/MariaDB one (statement counts from the
//! server's global status, waiters from the processlist), sample
//! statistics, process CPU time and the Markdown report. `scripts/bench.sh`
//! runs both and writes `BENCHMARKS.md`.
//!
//! ```
//! use std::time::Duration;
//! use shardlock_benches::{RawMemoryLocks, Samples};
//!
//! let locks = RawMemoryLocks::default();
//! let mut samples = Samples::default();
//! for _ in 0..10 {
//!     let started = std::time::Instant::now();
//!     assert!(locks.try_lock(7, 1));
//!     assert!(locks.unlock(7, 1));
//!     samples.push(started.elapsed());
//! }
//! assert_eq!(samples.len(), 10);
//! assert!(samples.p50().unwrap_or(Duration::MAX) < Duration::from_secs(1));
//! ```
#![doc(test(attr(deny(warnings))))]

mod cpu;
mod mysql;
mod pg;
mod raw;
mod report;
mod stats;

pub use cpu::{process_cpu_time, CpuSnapshot};
pub use mysql::{MySqlEnv, RawMySql, ServerStatements, StatusCounts, MYSQL_URL_ENV};
pub use pg::{PgEnv, StatementCalls, StatementCounter, URL_ENV};
pub use raw::{RawMemoryLocks, RawPg, RawSqlite};
pub use report::{Report, Row, Target, Verdict};
pub use stats::{fmt_duration, ratio, Samples};
