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

#[macro_use]
pub mod sql;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventcore_memory::InMemoryEventStore;
use eventcore_types::{
    Event, EventFilter, EventPage, EventReader as _, EventStore as _, Projector, StreamId,
    StreamPosition, StreamVersion, StreamWrites,
};

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

// ===== an eventcore event and projector for the end-to-end tests =====

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Tick {
    pub stream: StreamId,
    pub n: u64,
}

impl Event for Tick {
    fn stream_id(&self) -> &StreamId {
        &self.stream
    }

    fn event_type_name() -> &'static str {
        "Tick"
    }
}

/// Appends ticks 1..=n to one stream.
pub async fn seed(store: &InMemoryEventStore, n: u64) {
    let stream = StreamId::try_new("ticks").unwrap_or_else(|e| panic!("{e}"));
    let mut writes = StreamWrites::new()
        .register_stream(stream.clone(), StreamVersion::new(0))
        .unwrap_or_else(|e| panic!("{e}"));
    for i in 1..=n {
        writes = writes
            .append(Tick {
                stream: stream.clone(),
                n: i,
            })
            .unwrap_or_else(|e| panic!("{e}"));
    }
    store
        .append_events(writes)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Every tick's position, in order.
pub async fn positions(store: &InMemoryEventStore) -> Vec<StreamPosition> {
    let page = EventPage::first(eventcore_types::BatchSize::new(100_000));
    store
        .read_events::<Tick>(EventFilter::all(), page)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

/// Records `(node, tick)` for every tick applied, pacing each by `pace`.
pub struct Recorder {
    pub name: String,
    pub node: &'static str,
    pub seen: Arc<Mutex<Vec<(&'static str, u64)>>>,
    pub pace: Duration,
}

impl Projector for Recorder {
    type Event = Tick;
    type Error = Infallible;
    type Context = ();

    fn apply(&mut self, tick: Tick, _: StreamPosition, _: &mut ()) -> Result<(), Infallible> {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((self.node, tick.n));
        std::thread::sleep(self.pace);
        Ok(())
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// `(node, tick)` pairs of one node, in order.
pub fn applied_by(seen: &[(&'static str, u64)], node: &str) -> Vec<u64> {
    seen.iter()
        .filter(|(n, _)| *n == node)
        .map(|(_, e)| *e)
        .collect()
}

/// Checks a handover of `events` ticks from node `a` to node `b`: each
/// applied one contiguous run in order, `a` from the first tick, `b`
/// through the last. Answers `a`'s last tick and `b`'s first.
pub fn handed_over(seen: &[(&'static str, u64)], events: u64) -> (u64, u64) {
    let (a, b) = (applied_by(seen, "a"), applied_by(seen, "b"));
    assert_eq!(a, (1..=a.len() as u64).collect::<Vec<_>>());
    let (a_last, b_first) = (*a.last().unwrap_or(&0), *b.first().unwrap_or(&0));
    assert_eq!(
        b,
        (b_first..=events).collect::<Vec<_>>(),
        "b skipped or repeated"
    );
    (a_last, b_first)
}

/// `advance` keeps the greatest position (bytewise = eventcore's order,
/// including the top bit and the last byte), and `load` answers it exactly.
pub async fn advance_only_forward(positions: &impl shardlock_eventcore::PositionTable) {
    let name = shardlock_contract_tests::unique_name("positions");
    let at = |bits: u128| StreamPosition::new(uuid::Uuid::from_u128(bits));
    let load = || async {
        positions
            .load(&name)
            .await
            .unwrap_or_else(|e| panic!("load: {e}"))
    };
    assert_eq!(load().await, None);
    for (advance, expected) in [
        (at(5), at(5)),
        (at(4), at(5)),
        (at(1 << 127), at(1 << 127)),
        (at(u128::MAX - 1), at(u128::MAX - 1)),
        (at(7), at(u128::MAX - 1)),
        (at(u128::MAX), at(u128::MAX)),
    ] {
        positions
            .advance(&name, advance)
            .await
            .unwrap_or_else(|e| panic!("advance: {e}"));
        assert_eq!(
            load().await,
            Some(expected),
            "after advancing to {advance:?}"
        );
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
