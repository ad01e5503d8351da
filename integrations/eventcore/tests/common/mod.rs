//! eventcore's published backend contract (`eventcore_testing::contract`),
//! stamped out per driver.
//!
//! `checkpoint_contract!(module, expr)` and `coordination_contract!(module,
//! expr)` each expand to a module with one `#[tokio::test]` per
//! eventcore-testing function. `expr` is
//! an async expression (it may use `.await`) answering `Option<F>`, where
//! `F` is the factory closure eventcore's functions take; `None` means the
//! server is not available, and the harness has printed its loud
//! `SKIPPED` line. The tests run on a current-thread runtime (guards must
//! release on drop there too); `released_on_guard_drop` runs on both.

#![allow(dead_code, unused_macros, unreachable_pub)]

use std::path::PathBuf;

/// A fresh directory under the system's temp dir.
pub fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(shardlock_contract_tests::unique_name(&format!(
        "eventcore-{what}"
    )));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("cannot create {}: {e}", dir.display());
    }
    dir
}

/// Panics with eventcore's failure text.
pub fn check(result: eventcore_testing::contract::ContractTestResult) {
    if let Err(failure) = result {
        panic!("eventcore contract failed: {failure}");
    }
}

macro_rules! checkpoint_contract {
    ($module:ident, $make:expr) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            use eventcore_testing::contract as ec;

            #[tokio::test]
            async fn checkpoint_save_and_load() {
                let Some(make) = $make else { return };
                common::check(ec::test_checkpoint_save_and_load(make).await);
            }

            #[tokio::test]
            async fn checkpoint_update_overwrites() {
                let Some(make) = $make else { return };
                common::check(ec::test_checkpoint_update_overwrites(make).await);
            }

            #[tokio::test]
            async fn checkpoint_load_missing_returns_none() {
                let Some(make) = $make else { return };
                common::check(ec::test_checkpoint_load_missing_returns_none(make).await);
            }

            #[tokio::test]
            async fn checkpoint_independent_subscriptions() {
                let Some(make) = $make else { return };
                common::check(ec::test_checkpoint_independent_subscriptions(make).await);
            }
        }
    };
}

macro_rules! coordination_contract {
    ($module:ident, $make:expr) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            use eventcore_testing::contract as ec;

            #[tokio::test]
            async fn coordination_acquire_leadership() {
                let Some(make) = $make else { return };
                common::check(ec::test_coordination_acquire_leadership(make).await);
            }

            #[tokio::test]
            async fn coordination_second_instance_blocked() {
                let Some(make) = $make else { return };
                common::check(ec::test_coordination_second_instance_blocked(make).await);
            }

            #[tokio::test]
            async fn coordination_independent_subscriptions() {
                let Some(make) = $make else { return };
                common::check(ec::test_coordination_independent_subscriptions(make).await);
            }

            #[tokio::test]
            async fn coordination_leadership_released_on_guard_drop() {
                let Some(make) = $make else { return };
                common::check(ec::test_coordination_leadership_released_on_guard_drop(make).await);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn coordination_leadership_released_on_guard_drop_multi_thread() {
                let Some(make) = $make else { return };
                common::check(ec::test_coordination_leadership_released_on_guard_drop(make).await);
            }

            /// The same drop-then-acquire, 20 times in a row.
            #[tokio::test]
            async fn coordination_released_on_guard_drop_repeatedly() {
                let Some(make) = $make else { return };
                for _ in 0..20 {
                    common::check(
                        ec::test_coordination_leadership_released_on_guard_drop(make.clone()).await,
                    );
                }
            }
        }
    };
}
