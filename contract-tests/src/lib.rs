//! The driver contract suite of shardlock: the behaviour every driver must
//! pass, as plain async functions plus [`driver_contract_tests!`], which
//! stamps out one `#[tokio::test]` per clause for a driver.
//!
//! **Not API-stable**, and destructive only to keys it creates itself (each
//! test uses fresh key names with a random suffix, so tests run in parallel
//! against one database and never wipe shared state).
//!
//! A driver author implements [`Harness`] (how to get drivers, a database,
//! and how to kill a session or a process) and writes:
//!
//! ```text
//! shardlock_contract_tests::driver_contract_tests!(my_harness().await);
//! ```
//!
//! where the expression evaluates to `Option<H>`: `None` means the server is
//! not available, and every generated test prints a loud `SKIPPED` line
//! (see [`skip`]) instead of passing silently.
//!
//! # Test support shared by the driver crates
//!
//! - [`holder`]: the one holder-process protocol (arguments, the
//!   `GRANTED <bits>` line, `--wait`) and its test side, for clause 9 and
//!   the cross-process tests.
//! - `container` (feature `containers`): one reusable testcontainers
//!   container per image, shared by every test process, for the Postgres
//!   and SQL Server harnesses.
//! - [`assert_fenced_off`] and [`assert_not_claimed`]: the refusal checks of
//!   checkpoint stores, also for their transactional `save_in`.
//! - [`FencedHarness`] and the `fenced_*` scenarios: session-fenced
//!   transactions (a leader ended mid-batch commits no stale effect).
//!
//! # Holders are example targets
//!
//! Each driver crate's holder process is an `[[example]]`
//! (`examples/shardlock-<driver>-holder.rs`), not a `[[bin]]`:
//!
//! - `cargo install` and users of the library never build or get it;
//! - an example may use dev-dependencies, so it calls [`holder::main`]
//!   without making this crate a dependency of the driver;
//! - `cargo test` and `cargo nextest run` (`--workspace` or `-p`) build
//!   every example before running tests, into
//!   `target/<profile>/examples/`, where [`holder::example`] finds it from
//!   the test binary's path.
//!
//! The cost: cargo sets no `CARGO_BIN_EXE_*` for examples and does not
//! build them when targets are picked (`--test contract`); the test then
//! fails saying to run `cargo build -p <driver crate> --examples`. The
//! alternative, a `[[bin]]` with `required-features = ["holder"]` enabled
//! through a dev-dependency of the crate on itself, keeps `CARGO_BIN_EXE_*`
//! but needs this crate as an optional normal dependency of every driver
//! (a binary cannot use dev-dependencies) and a self-dependency hack.

mod balancing;
mod clauses;
#[cfg(feature = "containers")]
pub mod container;
mod fenced;
mod harness;
pub mod holder;
mod projection;
mod recorder;
mod scenarios;

pub use balancing::*;
pub use clauses::*;
pub use fenced::*;
pub use harness::{
    closed_port, median_round_trip, skip, unique_keys, unique_name, until_ready, until_waiting,
    within, Harness, Holder, SessionOf, Timings, WaiterPoll, UNOBSERVED_WAIT,
};
pub use projection::*;
pub use recorder::{Recorder, RecordingAgent, ShardRun};
pub use scenarios::*;

/// For the macros: `shardlock_core` as the suite names it.
#[doc(hidden)]
pub use shardlock_core as __core;

/// Instantiates every contract clause and coordinator scenario as a
/// `#[tokio::test]` for a driver.
///
/// `$harness` is an expression (it may use `.await`) of type `Option<H>`
/// where `H: Harness`. The tests run on a multi-thread runtime, each under
/// an outer hang guard of twelve times [`Harness::settle`] (every await
/// inside has its own, shorter one).
#[macro_export]
macro_rules! driver_contract_tests {
    ($harness:expr) => {
        $crate::driver_contract_tests!(@tests $harness;
            clause_1_exclusive,
            clause_1_concurrent_race,
            clause_2_try_acquire_idempotent,
            clause_2_dropped_try_acquire_poisons,
            clause_3_batch,
            clause_4_acquire_waits,
            clause_4_acquire_cancel_safe,
            clause_4_acquire_drop_safe,
            clause_5_release,
            clause_5_release_many,
            clause_6_close_releases,
            clause_6_drop_releases,
            clause_6_drop_on_current_thread_runtime,
            clause_7_independent_keys,
            clause_8_verify_detects_loss,
            clause_8_loss_signalled,
            clause_9_crash_releases,
            clause_10_typed_errors,
            clause_10_connect_error_typed,
            clause_11_probe,
            clause_12_release_announced,
            hostile_names,
            leadership_handoff,
            leadership_attempts_share_one_session,
            leadership_drop_then_reacquire,
            scenario_spread_and_graceful_stop,
            scenario_failing_agent_restarted,
            scenario_double_start_is_error,
            scenario_balance_join_leave_crash,
            scenario_balance_stable,
            scenario_balance_alone_weights_and_scale,
            scenario_balance_graceful_handoff,
        );
    };
    (@tests $harness:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(harness) = $harness else { return; };
                let limit = $crate::Harness::settle(&harness) * 12;
                $crate::within(limit, stringify!($name), $crate::$name(&harness)).await;
            }
        )*
    };
}
