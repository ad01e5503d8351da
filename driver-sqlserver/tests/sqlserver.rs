//! SQL Server specifics beyond the shared contract, against a real server
//! (same gate as the contract suite: see `common/mod.rs`).

mod common;

use std::time::{Duration, Instant};

use shardlock_contract_tests::{unique_keys, unique_name, Harness};
use shardlock_core::{DatabaseId, Driver, Error, LockKey, NodeId, Session};
use shardlock_sqlserver::{resource_name, MssqlDriver, MssqlError, MssqlSession};

async fn open(h: &common::MssqlHarness, node: &str) -> MssqlSession {
    match h.driver().connect(&h.database(), &NodeId::new(node)).await {
        Ok(s) => s,
        Err(e) => panic!("connect failed: {e:?}"),
    }
}

/// Resource names are compared binary: keys differing only in case are two
/// locks, whatever the database collation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_names_are_case_sensitive() {
    let Some(h) = common::harness().await else {
        return;
    };
    let base = unique_name("case");
    let upper = LockKey::new(format!("{base}-ORDERS")).expect("valid");
    let lower = LockKey::new(format!("{base}-orders")).expect("valid");
    let mut a = open(&h, "a").await;
    let mut b = open(&h, "b").await;
    assert_eq!(
        a.try_acquire(std::slice::from_ref(&upper))
            .await
            .expect("a"),
        vec![true]
    );
    assert_eq!(
        b.try_acquire(std::slice::from_ref(&lower))
            .await
            .expect("b"),
        vec![true],
        "a different case is a different lock"
    );
    assert_eq!(b.try_acquire(&[upper]).await.expect("b"), vec![false]);
    a.close().await.expect("close");
    b.close().await.expect("close");
}

/// The server shows the session as `shardlock:<node>` and its locks as
/// session-owned APPLICATION locks under the documented resource names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_views_show_the_node_and_its_locks() {
    let Some(h) = common::harness().await else {
        return;
    };
    let keys = unique_keys("views", 3);
    let node = unique_name("node");
    let mut a = open(&h, &node).await;
    shardlock_contract_tests::take_all(&mut a, &keys).await;
    let mut side = h.raw(h.database().as_str()).await;
    let row = side
        .query(
            "SELECT program_name FROM sys.dm_exec_sessions WHERE session_id = @P1",
            &[&a.spid()],
        )
        .await
        .expect("query")
        .into_row()
        .await
        .expect("row")
        .expect("the session exists");
    let program: Option<&str> = row.get(0);
    assert_eq!(program, Some(format!("shardlock:{node}").as_str()));
    let rows = side
        .query(
            "SELECT COUNT(*) FROM sys.dm_tran_locks WHERE request_session_id = @P1 \
             AND resource_type = N'APPLICATION' AND request_owner_type = N'SESSION' \
             AND request_mode = N'X'",
            &[&a.spid()],
        )
        .await
        .expect("query")
        .into_row()
        .await
        .expect("row")
        .expect("a count");
    let count: Option<i32> = rows.get(0);
    assert_eq!(count, Some(3), "three exclusive session-owned app locks");
    // The same resource name from T-SQL is the same lock.
    let probe = side
        .query(
            "SELECT APPLOCK_TEST(N'public', @P1, N'Exclusive', N'Session')",
            &[&resource_name(&keys[0]).as_str()],
        )
        .await
        .expect("query")
        .into_row()
        .await
        .expect("row")
        .expect("a value");
    let grantable: Option<i32> = probe.get(0);
    assert_eq!(grantable, Some(0), "held by the session, not grantable");
    let _ = side.close().await;
    a.close().await.expect("close");
}

/// 10,000 keys in one call: one round trip on SQL Server 2016+.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_keys_in_one_batch() {
    let Some(h) = common::harness().await else {
        return;
    };
    let keys = unique_keys("big", 10_000);
    let mut a = open(&h, "a").await;
    let started = Instant::now();
    let granted = a.try_acquire(&keys).await.expect("batch");
    let took = started.elapsed();
    assert_eq!(granted.len(), keys.len());
    assert!(granted.iter().all(|g| *g));
    a.verify().await.expect("verify 10,000 locks");
    let started = Instant::now();
    a.release_all().await.expect("release all");
    eprintln!(
        "sqlserver: 10,000 keys: try_acquire {took:?}, release_all {:?}",
        started.elapsed()
    );
    a.close().await.expect("close");
}

/// A database below compatibility level 130 has no OPENJSON: batches fall
/// back to one parameter per name, 2000 per round trip, with the same
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameter_batches_below_compatibility_level_130() {
    let Some(h) = common::harness().await else {
        return;
    };
    let database = format!("{}_compat120", h.database());
    let mut side = h.raw("master").await;
    let setup = "DECLARE @db sysname = @P1;
IF DB_ID(@db) IS NULL
BEGIN
    DECLARE @sql nvarchar(max) = N'CREATE DATABASE ' + QUOTENAME(@db);
    EXEC (@sql);
    SET @sql = N'ALTER DATABASE ' + QUOTENAME(@db) + N' SET COMPATIBILITY_LEVEL = 120';
    EXEC (@sql);
END;";
    if let Err(e) = side.execute(setup, &[&database.as_str()]).await {
        assert_eq!(e.code(), Some(1801), "create {database}: {e}");
    }
    let _ = side.close().await;
    let db = DatabaseId::new(&database);
    let driver = h.driver();
    let mut a = driver.connect(&db, &NodeId::new("a")).await.expect("a");
    let mut b = driver.connect(&db, &NodeId::new("b")).await.expect("b");
    let keys = unique_keys("compat", 4500);
    let odd: Vec<LockKey> = keys.iter().skip(1).step_by(2).cloned().collect();
    assert!(b.try_acquire(&odd).await.expect("b").iter().all(|g| *g));
    let granted = a.try_acquire(&keys).await.expect("a");
    for (i, g) in granted.iter().enumerate() {
        assert_eq!(*g, i % 2 == 0, "key {i}");
    }
    a.verify().await.expect("verify in three chunks");
    a.release_all().await.expect("release");
    b.release_all().await.expect("release");
    assert!(a.try_acquire(&keys).await.expect("a").iter().all(|g| *g));
    a.close().await.expect("close");
    b.close().await.expect("close");
}

/// Connect failures are typed: a wrong password and a missing database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_failures_are_typed() {
    let Some(h) = common::harness().await else {
        return;
    };
    let wrong = h.options().clone().map_config(|c| {
        c.authentication(shardlock_sqlserver::tiberius::AuthMethod::sql_server(
            "sa",
            "not-the-password-1A!",
        ))
    });
    let e = MssqlDriver::new(wrong)
        .open_session(&h.database(), &NodeId::new("x"))
        .await
        .expect_err("wrong password");
    assert!(matches!(e, MssqlError::LoginFailed { .. }), "{e:?}");

    let missing = DatabaseId::new(unique_name("no_such_db").replace('-', "_"));
    let e = h
        .driver()
        .open_session(&missing, &NodeId::new("x"))
        .await
        .expect_err("missing database");
    assert!(matches!(e, MssqlError::DatabaseUnavailable { .. }), "{e:?}");
    match h.driver().connect(&missing, &NodeId::new("x")).await {
        Err(Error::Connect { database, kind, .. }) => {
            assert_eq!(database, missing);
            assert_ne!(
                kind,
                shardlock_core::ErrorKind::Other,
                "a missing database is classified"
            );
        }
        other => panic!("expected Error::Connect, got {other:?}"),
    }
}

/// A wait cancelled just as the holder releases never leaves the lock with
/// the waiter, across many attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_racing_a_grant_leaves_nothing_held() {
    let Some(h) = common::harness().await else {
        return;
    };
    let mut a = open(&h, "a").await;
    let mut b = open(&h, "b").await;
    let mut probe = open(&h, "probe").await;
    for round in 0..10 {
        let key = unique_keys("cancelrace", 1).remove(0);
        assert!(a.try_acquire(std::slice::from_ref(&key)).await.expect("a")[0]);
        let cancel = shardlock_core::CancellationToken::new();
        let (got, ()) = tokio::join!(b.acquire(&key, &cancel), async {
            tokio::time::sleep(Duration::from_millis(50 + round * 7)).await;
            cancel.cancel();
            let _ = a.release(&key).await;
        });
        let got = got.expect("acquire");
        if got {
            assert_eq!(b.held(), vec![key.clone()]);
            assert!(b.release(&key).await.expect("release"));
        } else {
            assert!(b.held().is_empty());
        }
        // Either way, nobody holds it now.
        assert_eq!(
            probe
                .try_acquire(std::slice::from_ref(&key))
                .await
                .expect("probe"),
            vec![true],
            "round {round}: answered {got} but the key is still held"
        );
        assert!(probe.release(&key).await.expect("release"));
    }
    for s in [a, b, probe] {
        s.close().await.expect("close");
    }
}
