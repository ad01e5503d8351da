//! MySQL-specific checks beyond the contract suite: big batches in one
//! round trip, a wait killed by someone else, typed connect errors, and
//! names that differ only in case.

mod common;

use std::time::Duration;

use shardlock_contract_tests::{unique_keys, Harness};
use shardlock_core::{CancellationToken, DatabaseId, Driver, Error, ErrorKind, NodeId, Session};
use shardlock_mysql::{MySqlDriver, MySqlError};

fn source_of(err: &Error) -> Option<&MySqlError> {
    std::error::Error::source(err).and_then(|s| s.downcast_ref::<MySqlError>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_5000_keys_is_one_round_trip() {
    let Some(h) = common::harness().await else {
        return;
    };
    let keys = unique_keys("big", 5000);
    let driver = h.driver();
    let node = NodeId::new("big");
    let mut a = driver
        .connect(&h.database(), &node)
        .await
        .expect("connect a");
    let mut b = driver
        .connect(&h.database(), &node)
        .await
        .expect("connect b");
    let before = a.round_trips();
    let granted = a.try_acquire(&keys).await.expect("batch");
    assert!(granted.iter().all(|g| *g));
    assert_eq!(a.round_trips() - before, 1, "one command for 5,000 keys");
    a.verify().await.expect("verify 5,000 held keys");
    assert_eq!(a.round_trips() - before, 2);
    let denied = b.try_acquire(&keys).await.expect("batch b");
    assert!(denied.iter().all(|g| !*g));
    let probed = b.probe(&keys).await.expect("probe");
    assert!(probed.iter().all(|p| *p));
    a.release_all().await.expect("release all");
    assert_eq!(a.round_trips() - before, 3);
    assert!(b
        .try_acquire(&keys)
        .await
        .expect("again")
        .iter()
        .all(|g| *g));
    a.close().await.expect("close a");
    b.close().await.expect("close b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_killed_by_someone_else_is_a_typed_error() {
    let Some(h) = common::harness().await else {
        return;
    };
    let key = unique_keys("killed", 1).remove(0);
    let driver = h.driver();
    let mut a = driver
        .connect(&h.database(), &NodeId::new("a"))
        .await
        .expect("a");
    let mut b = driver
        .connect(&h.database(), &NodeId::new("b"))
        .await
        .expect("b");
    assert!(a.try_acquire(std::slice::from_ref(&key)).await.expect("a")[0]);
    let id = b.connection_id();
    let url = h.url().to_string();
    let waiting = h.wait_until_waiting(&key);
    let killer = async move {
        waiting.await;
        let mut conn = {
            use shardlock_mysql::sqlx::Connection;
            shardlock_mysql::sqlx::MySqlConnection::connect(&url)
                .await
                .expect("side")
        };
        use shardlock_mysql::sqlx::Executor;
        conn.execute(format!("KILL QUERY {id}").as_str())
            .await
            .expect("kill");
    };
    let cancel = CancellationToken::new();
    let (waited, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(10), b.acquire(&key, &cancel)),
        killer
    );
    let err = waited.expect("the wait ended").expect_err("killed");
    assert!(
        matches!(source_of(&err), Some(MySqlError::LockWaitKilled { .. })),
        "{err:?}"
    );
    assert!(!err.is_session_fatal(), "{err:?}");
    b.verify().await.expect("the session is still usable");
    assert!(b.held().is_empty());
    a.close().await.expect("close a");
    b.close().await.expect("close b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_errors_are_typed() {
    let Some(h) = common::harness().await else {
        return;
    };
    let node = NodeId::new("errors");
    let unknown = MySqlDriver::new(
        h.options()
            .clone()
            .database_mapping(shardlock_mysql::DatabaseMapping::SameServer),
    );
    let err = unknown
        .connect(&DatabaseId::new("no_such_database_here"), &node)
        .await
        .expect_err("unknown database");
    assert!(
        matches!(source_of(&err), Some(MySqlError::UnknownDatabase { .. })),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Config);
    let wrong = MySqlDriver::new(
        h.options()
            .clone()
            .username("nobody_here")
            .password("wrong"),
    );
    let err = wrong
        .connect(&h.database(), &node)
        .await
        .expect_err("bad credentials");
    assert!(
        matches!(source_of(&err), Some(MySqlError::Authentication { .. })),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_differing_only_in_case_are_distinct_locks() {
    let Some(h) = common::harness().await else {
        return;
    };
    let base = shardlock_contract_tests::unique_name("case");
    let upper = shardlock_core::LockKey::new(format!("{base}-Tenant")).expect("key");
    let lower = shardlock_core::LockKey::new(format!("{base}-tenant")).expect("key");
    let driver = h.driver();
    let mut a = driver
        .connect(&h.database(), &NodeId::new("a"))
        .await
        .expect("a");
    let mut b = driver
        .connect(&h.database(), &NodeId::new("b"))
        .await
        .expect("b");
    assert!(a.try_acquire(&[upper]).await.expect("a")[0]);
    assert!(
        b.try_acquire(&[lower]).await.expect("b")[0],
        "a key differing only in case is another lock"
    );
    a.close().await.expect("close a");
    b.close().await.expect("close b");
}
