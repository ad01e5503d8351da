//! PostgreSQL-specific behaviour beyond the shared contract: typed connect
//! errors, the session label, negative keys in `pg_locks`, the races of a
//! blocking wait, broken sessions, drop without a runtime, `probe` from
//! `pg_locks`, and release hints (`NOTIFY` on release, the hints
//! connection).

mod common;

use std::collections::BTreeSet;
use std::error::Error as _;
use std::future::Future;
use std::task::Poll;
use std::time::{Duration, Instant};

use common::{harness, holder_program, waiting_pids, OwnContainer, PgHarness, URL_ENV};
use shardlock_contract_tests::holder::HolderProcess;
use shardlock_contract_tests::{unique_keys, unique_name, Harness};
use shardlock_core::{
    CancellationToken, DatabaseId, Driver, Error, LockKey, NodeId, ReleaseHints, Session, Support,
};
use shardlock_postgres::sqlx::{self, Connection};
use shardlock_postgres::{DatabaseMapping, PgDriver, PgError, PgOptions, PgSession};

async fn open(h: &PgHarness, node: &str) -> PgSession {
    match h.driver().connect(&h.database(), &NodeId::new(node)).await {
        Ok(s) => s,
        Err(e) => panic!("connect failed: {e:?}"),
    }
}

/// Waits until another session can take `key`, within `limit`.
async fn free_within(h: &PgHarness, key: &LockKey, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut probe = open(h, "probe").await;
    loop {
        if probe
            .try_acquire(std::slice::from_ref(key))
            .await
            .expect("probe")[0]
        {
            probe.close().await.expect("close probe");
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{key} still held after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pg_error(err: &Error) -> &PgError {
    err.source()
        .and_then(|s| s.downcast_ref::<PgError>())
        .unwrap_or_else(|| panic!("no PgError behind {err:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_errors_are_typed() {
    let Some(h) = harness().await else { return };
    let db = h.database();
    let node = NodeId::new("errors");

    // One database per id (the default follows the URL, which names one).
    let per_id = PgDriver::new(
        h.options()
            .clone()
            .database_mapping(DatabaseMapping::SameServer),
    );
    let unknown = DatabaseId::new("shardlock_no_such_database");
    match per_id.connect(&unknown, &node).await {
        Err(err @ Error::Connect { .. }) => {
            assert!(
                matches!(pg_error(&err), PgError::UnknownDatabase { .. }),
                "{err:?}"
            );
            let text = pg_error(&err).to_string();
            assert!(text.contains("shardlock_no_such_database"), "{text}");
            assert!(text.contains("database_mapping"), "{text}");
        }
        other => panic!("unknown database gave {other:?}"),
    }

    let closed = PgDriver::new(
        h.options()
            .clone()
            .host("127.0.0.1")
            .port(1)
            .connect_timeout(Duration::from_secs(5)),
    );
    match closed.connect(&db, &node).await {
        Err(err @ Error::Connect { .. }) => {
            assert!(
                matches!(pg_error(&err), PgError::Unreachable { .. }),
                "{err:?}"
            );
            assert!(pg_error(&err).to_string().contains("127.0.0.1:1"));
        }
        other => panic!("closed port gave {other:?}"),
    }

    let wrong = PgDriver::new(h.options().clone().password("shardlock-wrong-password"));
    match wrong.connect(&db, &node).await {
        Err(err @ Error::Connect { .. }) => match pg_error(&err) {
            PgError::Authentication { code, .. } => assert!(code.starts_with("28"), "{code}"),
            other => panic!("wrong password gave {other:?}"),
        },
        Ok(_) => eprintln!("note: the server trusts this user; wrong-password check not run"),
        Err(other) => panic!("wrong password gave {other:?}"),
    }

    let fixed = PgDriver::new(
        h.options()
            .clone()
            .database_mapping(DatabaseMapping::Fixed(db.as_str().to_string())),
    );
    let session = fixed
        .connect(&DatabaseId::new("logical-name"), &node)
        .await
        .expect("a fixed mapping connects any id to the one database");
    assert_eq!(session.database().as_str(), "logical-name");
    session.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_is_labelled_with_the_node() {
    let Some(h) = harness().await else { return };
    let node = unique_name("label");
    let session = open(&h, &node).await;
    let mut raw = h.raw().await;
    let name: String =
        sqlx::query_scalar("SELECT application_name FROM pg_stat_activity WHERE pid = $1")
            .bind(session.backend_pid())
            .fetch_one(&mut raw)
            .await
            .expect("pg_stat_activity");
    assert_eq!(name, format!("shardlock:{node}"));
    assert!(session.server_version_num() >= shardlock_postgres::MIN_SERVER_VERSION_NUM);
    let long = "ü".repeat(80);
    let labelled = open(&h, &long).await;
    let name: String =
        sqlx::query_scalar("SELECT application_name FROM pg_stat_activity WHERE pid = $1")
            .bind(labelled.backend_pid())
            .fetch_one(&mut raw)
            .await
            .expect("pg_stat_activity");
    assert!(name.starts_with("shardlock:"), "{name}");
    assert!(name.len() <= 63, "{name}");
    session.close().await.expect("close");
    labelled.close().await.expect("close");
    raw.close().await.expect("close");
}

/// Negative and positive ids, as `pg_locks` shows them (classid = high 32
/// bits, objid = low 32 bits): `verify` passes, and an independent reading
/// of `pg_locks` finds exactly the held keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_sees_negative_and_positive_keys() {
    let Some(h) = harness().await else { return };
    // Names that differ only at the end hash to ids of one sign (FNV-1a
    // mixes the last bytes into the low bits), so draw fresh names until
    // both signs are well represented.
    let (mut negative, mut positive) = (Vec::new(), Vec::new());
    while negative.len() < 20 || positive.len() < 20 {
        let key = unique_keys("signs", 1).remove(0);
        if key.id() < 0 {
            negative.push(key);
        } else {
            positive.push(key);
        }
    }
    let keys: Vec<LockKey> = negative
        .into_iter()
        .take(20)
        .chain(positive.into_iter().take(20))
        .collect();
    let mut a = open(&h, "signs").await;
    shardlock_contract_tests::take_all(&mut a, &keys).await;
    a.verify().await.expect("verify with negative keys held");
    let mut raw = h.raw().await;
    let shown: Vec<i64> = sqlx::query_scalar(
        "SELECT ((classid::bigint << 32) | objid::bigint) FROM pg_locks \
         WHERE locktype = 'advisory' AND pid = $1 AND granted AND objsubid = 1",
    )
    .bind(a.backend_pid())
    .fetch_all(&mut raw)
    .await
    .expect("pg_locks");
    let shown: BTreeSet<i64> = shown.into_iter().collect();
    let expected: BTreeSet<i64> = keys.iter().map(LockKey::id).collect();
    assert_eq!(shown, expected, "each key held exactly once");
    // Releasing half (of both signs) keeps verify green for the rest.
    for key in keys.iter().step_by(2) {
        assert!(a.release(key).await.expect("release"));
    }
    a.verify().await.expect("verify after releases");
    a.close().await.expect("close");
    raw.close().await.expect("close");
}

/// Taking a held key again (try or blocking) never stacks a second hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_never_stack() {
    let Some(h) = harness().await else { return };
    let key = unique_keys("stack", 1).remove(0);
    let mut a = open(&h, "a").await;
    let never = CancellationToken::new();
    assert!(a.acquire(&key, &never).await.expect("acquire"));
    assert!(
        a.try_acquire(&[key.clone(), key.clone()])
            .await
            .expect("try")[0]
    );
    assert!(a.acquire(&key, &never).await.expect("acquire again"));
    assert!(a.release(&key).await.expect("release"));
    free_within(&h, &key, Duration::from_secs(2)).await;
    a.close().await.expect("close");
}

/// A grant that arrives after the acquire future was last polled, and
/// before it is dropped, is given back: the key is free for others and the
/// session stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_acquire_after_an_unseen_grant_gives_the_key_back() {
    let Some(h) = harness().await else { return };
    let key = unique_keys("unseen", 1).remove(0);
    let mut a = open(&h, "a").await;
    let mut b = open(&h, "b").await;
    assert!(a.try_acquire(std::slice::from_ref(&key)).await.expect("a")[0]);
    let never = CancellationToken::new();
    {
        let mut waiting = Box::pin(b.acquire(&key, &never));
        tokio::select! {
            _ = &mut waiting => panic!("acquire must wait while a holds the key"),
            () = tokio::time::sleep(Duration::from_millis(150)) => {}
        }
        assert!(a.release(&key).await.expect("release"));
        // The wait is granted now, but the future is not polled again.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let took = free_within(&h, &key, Duration::from_secs(5)).await;
    eprintln!("unseen grant given back after {took:?}");
    assert!(b.held().is_empty(), "b holds nothing: {:?}", b.held());
    b.verify().await.expect("b is still a good session");
    let other = unique_keys("unseen-other", 1).remove(0);
    assert!(
        b.try_acquire(std::slice::from_ref(&other))
            .await
            .expect("b")[0]
    );
    b.close().await.expect("close");
    a.close().await.expect("close");
}

/// Cancel and release racing: whatever `acquire` answers, the server agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_racing_a_grant_leaves_a_consistent_state() {
    let Some(h) = harness().await else { return };
    let mut a = open(&h, "a").await;
    let mut b = open(&h, "b").await;
    let mut c = open(&h, "c").await;
    let (mut granted, mut cancelled) = (0, 0);
    for (round, key) in unique_keys("race", 12).into_iter().enumerate() {
        assert!(a.try_acquire(std::slice::from_ref(&key)).await.expect("a")[0]);
        let cancel = CancellationToken::new();
        let waiter = {
            let (key, cancel) = (key.clone(), cancel.clone());
            tokio::spawn(async move {
                let got = b.acquire(&key, &cancel).await;
                (b, got)
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Release and cancel at nearly the same time, in varying order.
        if round % 2 == 0 {
            cancel.cancel();
            assert!(a.release(&key).await.expect("release"));
        } else {
            assert!(a.release(&key).await.expect("release"));
            tokio::time::sleep(Duration::from_micros(200 * round as u64)).await;
            cancel.cancel();
        }
        let (back, got) = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the wait ends")
            .expect("task");
        b = back;
        let got = got.expect("acquire answers");
        let c_got = c.try_acquire(std::slice::from_ref(&key)).await.expect("c")[0];
        assert_eq!(
            b.held().contains(&key),
            got,
            "round {round}: answer and held() agree"
        );
        assert_eq!(
            c_got, !got,
            "round {round}: the server agrees with b ({got})"
        );
        if got {
            granted += 1;
            assert!(b.release(&key).await.expect("release"));
        } else {
            cancelled += 1;
            assert!(c.release(&key).await.expect("release"));
        }
        b.verify().await.expect("b stays usable");
    }
    eprintln!("cancel race: {granted} granted, {cancelled} cancelled");
    for s in [a, b, c] {
        s.close().await.expect("close");
    }
}

/// A try-acquire dropped mid-round-trip leaves the session's locks unknown:
/// the session reports itself lost, and dropping it frees whatever it took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_round_trip_breaks_the_session() {
    let Some(h) = harness().await else { return };
    let mut a = open(&h, "a").await;
    // Polled once (the statement is sent), then dropped. Should the answer
    // come within that one poll (on a loaded machine the polling thread can
    // be descheduled between sending and reading long enough for the server
    // to answer), try again with fresh keys.
    let mut keys = Vec::new();
    const ATTEMPTS: usize = 50;
    let mut in_flight = false;
    for _ in 0..ATTEMPTS {
        keys = unique_keys("interrupted", 1000);
        let mut batch = Box::pin(a.try_acquire(&keys));
        // Exactly one poll (a zero timeout would poll again at the next
        // timer tick, time enough for a fast server to answer).
        let polled = std::future::poll_fn(|cx| Poll::Ready(batch.as_mut().poll(cx))).await;
        drop(batch);
        match polled {
            Poll::Pending => {
                in_flight = true;
                break;
            }
            Poll::Ready(Err(e)) => panic!("the batch failed instead of staying in flight: {e:?}"),
            Poll::Ready(Ok(_)) => {}
        }
        a.release_all().await.expect("release_all");
    }
    if !in_flight {
        // Seen once on a fully loaded 2-core machine. The same property is
        // also checked by the contract suite's
        // clause_2_dropped_try_acquire_poisons on Postgres.
        eprintln!(
            "NOT EXERCISED: interrupted_round_trip_breaks_the_session: every one of {ATTEMPTS} \
             batches was answered within its first poll, so none could be dropped in flight"
        );
        return;
    }
    match a.verify().await {
        Err(e) => assert!(e.is_session_fatal(), "{e:?}"),
        Ok(()) => panic!("verify must fail after an interrupted round trip"),
    }
    assert!(a.try_acquire(&keys).await.is_err(), "still broken");
    assert!(
        !a.release(&keys[0]).await.expect("release of an unheld key"),
        "releasing an unheld key stays Ok(false) on a broken session"
    );
    drop(a);
    for key in keys.iter().take(5) {
        free_within(&h, key, Duration::from_secs(5)).await;
    }
}

/// After the server ended the session: held keys cannot be released (the
/// session is lost), unheld ones still answer false, close does not fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_session_reports_loss() {
    let Some(h) = harness().await else { return };
    let keys = unique_keys("terminated", 2);
    let mut a = open(&h, "a").await;
    assert!(a.try_acquire(&keys[..1]).await.expect("a")[0]);
    h.terminate(&a).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let err = loop {
        match a.release(&keys[0]).await {
            Err(e) => break e,
            Ok(v) => {
                assert!(Instant::now() < deadline, "release still answers {v}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert!(err.is_session_fatal(), "{err:?}");
    assert!(matches!(err, Error::SessionLost { .. }), "{err:?}");
    assert!(!a.release(&keys[1]).await.expect("unheld"), "unheld: false");
    assert!(a.broken_reason().is_some());
    a.close()
        .await
        .expect("closing a lost session is not an error");
    free_within(&h, &keys[0], Duration::from_secs(5)).await;
}

/// Dropped where no runtime exists (after its runtime ended): no panic, and
/// the server frees the keys when the socket closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_without_a_runtime_frees_the_keys() {
    let Some(h) = harness().await else { return };
    let keys = unique_keys("noruntime", 3);
    let driver = h.driver();
    let db = h.database();
    let held = keys.clone();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let session = rt.block_on(async move {
            let mut s = driver
                .connect(&db, &NodeId::new("nort"))
                .await
                .expect("connect");
            shardlock_contract_tests::take_all(&mut s, &held).await;
            s
        });
        drop(rt);
        let started = Instant::now();
        drop(session);
        started.elapsed()
    });
    let took = tokio::task::spawn_blocking(move || thread.join())
        .await
        .expect("join")
        .expect("dropping without a runtime must not panic");
    assert!(
        took < Duration::from_millis(100),
        "drop blocked for {took:?}"
    );
    for key in &keys {
        free_within(&h, key, Duration::from_secs(5)).await;
    }
}

/// The driver's release window is what the coordinator checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_release_window_is_reported() {
    let Some(h) = harness().await else { return };
    assert_eq!(
        h.driver().lock_release_window(),
        Some(Duration::from_secs(25))
    );
    let none = PgDriver::new(h.options().clone().keepalives(None));
    assert_eq!(none.lock_release_window(), None);
    // Sessions open with the settings applied (a bad setting would fail).
    let mut s = none
        .connect(&h.database(), &NodeId::new("w"))
        .await
        .expect("connect");
    s.verify().await.expect("verify");
    s.close().await.expect("close");
}

/// A full shared lock table (SQLSTATE 53200) is a typed error naming
/// `max_locks_per_transaction`, and the keys the failed batch took are
/// released again. Needs a server of its own with a tiny lock table, so it
/// runs in container mode only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_table_full_is_typed_and_undone() {
    if std::env::var(URL_ENV).is_ok_and(|u| !u.trim().is_empty()) {
        eprintln!("lock_table_full_is_typed_and_undone: needs its own server (container mode), not run with {URL_ENV}");
        return;
    }
    if harness().await.is_none() {
        return;
    }
    let own = match OwnContainer::start(&[
        "-c",
        "max_locks_per_transaction=10",
        "-c",
        "max_connections=20",
    ])
    .await
    {
        Ok(own) => own,
        Err(why) => {
            shardlock_contract_tests::skip("postgres", &why, URL_ENV);
            return;
        }
    };
    let driver = PgDriver::new(PgOptions::parse(&own.url).expect("url"));
    let db = DatabaseId::new("postgres");
    let mut a = driver
        .connect(&db, &NodeId::new("full"))
        .await
        .expect("connect");
    let keys = unique_keys("full", 20_000);
    let err = match a.try_acquire(&keys).await {
        Err(err) => err,
        Ok(granted) => panic!(
            "20,000 keys fit a tiny lock table? {} granted",
            granted.iter().filter(|g| **g).count()
        ),
    };
    assert!(
        !err.is_session_fatal(),
        "a full lock table is not a lost session: {err:?}"
    );
    let pg = pg_error(&err);
    assert!(pg.is_lock_table_full(), "{pg:?}");
    assert_eq!(pg.sqlstate(), Some("53200"));
    let text = pg.to_string();
    assert!(text.contains("max_locks_per_transaction"), "{text}");
    eprintln!("lock table full: {text}");
    assert!(
        a.held().is_empty(),
        "nothing recorded as held: {}",
        a.held().len()
    );
    let mut raw = sqlx::PgConnection::connect(&own.url).await.expect("raw");
    let left: i64 = sqlx::query_scalar(
        // Keys only (`objsubid = 1`, the `bigint` form).
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1 AND objsubid = 1",
    )
    .bind(a.backend_pid())
    .fetch_one(&mut raw)
    .await
    .expect("pg_locks");
    assert_eq!(left, 0, "the failed batch's keys were released");
    // The session is still good for a batch that fits.
    assert!(a
        .try_acquire(&keys[..50])
        .await
        .expect("small batch")
        .iter()
        .all(|g| *g));
    a.verify().await.expect("verify");
    a.close().await.expect("close");
    raw.close().await.expect("close");
    drop(own);
}

/// `client_connection_check_interval` is applied: the backend of a client
/// killed while it waits in `pg_advisory_lock` ends within seconds, instead
/// of staying queued and taking the lock for nobody when it is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_waiter_leaves_the_queue() {
    let Some(h) = harness().await else { return };
    let key = unique_keys("killed-waiter", 1).remove(0);
    let mut a = open(&h, "a").await;
    if a.server_version_num() < 140_000 {
        eprintln!("killed_waiter_leaves_the_queue: needs PostgreSQL 14+");
        return;
    }
    assert!(a.try_acquire(std::slice::from_ref(&key)).await.expect("a")[0]);
    let (url, database, keys) = (h.url().to_string(), h.database(), vec![key.clone()]);
    let child = tokio::task::spawn_blocking(move || {
        HolderProcess::start_waiting(&holder_program(), &url, &database, &keys)
    })
    .await
    .expect("join")
    .expect("a waiting holder");
    // The waiting backend, as pg_locks shows it.
    let mut raw = h.raw().await;
    let started = Instant::now();
    let pid = loop {
        let pids = waiting_pids(&mut raw, &key).await.expect("pg_locks");
        if let Some(pid) = pids.first() {
            break *pid;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "holder never waited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    child.kill();
    let killed = Instant::now();
    loop {
        let alive: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
                .bind(pid)
                .fetch_one(&mut raw)
                .await
                .expect("pg_stat_activity");
        if !alive {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "the killed waiter's backend still waits after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("killed waiter's backend ended after {:?}", killed.elapsed());
    // a still holds the key, and releasing it hands it to nobody stale.
    a.verify().await.expect("a still holds");
    assert!(a.release(&key).await.expect("release"));
    free_within(&h, &key, Duration::from_secs(2)).await;
    a.close().await.expect("close");
    raw.close().await.expect("close");
}

/// The contract harness's view of a waiter (`common::waiters`) matches how
/// `pg_locks` shows a `bigint` advisory key, for negative and positive ids:
/// a raw `pg_advisory_lock` blocked behind a holder is counted, and only
/// for its own key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_match_pg_locks() {
    let Some(h) = harness().await else { return };
    let (mut negative, mut positive) = (None, None);
    while negative.is_none() || positive.is_none() {
        let key = unique_keys("waiters", 1).remove(0);
        if key.id() < 0 {
            negative.get_or_insert(key);
        } else {
            positive.get_or_insert(key);
        }
    }
    let mut side = h.raw().await;
    for key in [
        negative.expect("negative key"),
        positive.expect("positive key"),
    ] {
        let mut holder = h.raw().await;
        let _ = sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(key.id())
            .execute(&mut holder)
            .await
            .expect("holder takes the key");
        assert_eq!(
            common::waiters(&mut side, &key).await.expect("pg_locks"),
            0,
            "nobody waits yet for {key} ({})",
            key.id()
        );
        let mut waiter = h.raw().await;
        let id = key.id();
        let blocked = tokio::spawn(async move {
            let _ = sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(id)
                .execute(&mut waiter)
                .await
                .expect("waiter gets the key in the end");
            waiter
        });
        let started = Instant::now();
        while common::waiters(&mut side, &key).await.expect("pg_locks") == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the blocked pg_advisory_lock({}) never showed in pg_locks as {:?}",
                key.id(),
                common::split_key(key.id())
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let other = unique_keys("waiters-other", 1).remove(0);
        assert_eq!(
            common::waiters(&mut side, &other).await.expect("pg_locks"),
            0,
            "another key shows no waiter"
        );
        let _: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
            .bind(key.id())
            .fetch_one(&mut holder)
            .await
            .expect("unlock");
        let waiter = tokio::time::timeout(Duration::from_secs(10), blocked)
            .await
            .expect("the waiter is granted after the unlock")
            .expect("waiter task");
        let _ = waiter.close().await;
        let _ = holder.close().await;
    }
    let _ = side.close().await;
}

fn hints_of(session: &PgSession) -> ReleaseHints {
    session
        .signals()
        .release_hints()
        .cloned()
        .expect("a Postgres session offers release hints")
}

/// Waits until `hints` holds a clean mark for `key` (and takes it). Other
/// tests share the database and announce their own releases, so the
/// assertions here look at marks of this test's keys, never at counts.
async fn clean_arrives(hints: &ReleaseHints, key: &LockKey) {
    let started = Instant::now();
    while !hints.take_clean(key) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no clean mark for {key} arrived (received {} announcements)",
            hints.received()
        );
        let _ = tokio::time::timeout(Duration::from_millis(50), hints.released()).await;
    }
}

/// `n` fresh keys, half with negative ids and half with positive ones.
fn keys_of_both_signs(what: &str, n: usize) -> Vec<LockKey> {
    let (mut negative, mut positive) = (Vec::new(), Vec::new());
    while negative.len() < n / 2 || positive.len() < n - n / 2 {
        let key = unique_keys(what, 1).remove(0);
        if key.id() < 0 {
            negative.push(key);
        } else {
            positive.push(key);
        }
    }
    negative.truncate(n / 2);
    positive.truncate(n - n / 2);
    negative.into_iter().chain(positive).collect()
}

/// The advisory locks (`bigint` keys) a backend holds, as `pg_locks` shows.
async fn keys_held_by(raw: &mut sqlx::PgConnection, pid: i32) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1 \
         AND objsubid = 1",
    )
    .bind(pid)
    .fetch_one(raw)
    .await
    .expect("pg_locks")
}

/// The `application_name`s of a node's connections (the cancel side
/// connection excluded), sorted.
async fn connections_of(raw: &mut sqlx::PgConnection, node: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT application_name FROM pg_stat_activity \
         WHERE application_name = $1 OR application_name LIKE $1 || ':%' \
         AND application_name <> $1 || ':cancel' ORDER BY 1",
    )
    .bind(format!("shardlock:{node}"))
    .fetch_all(raw)
    .await
    .expect("pg_stat_activity")
}

/// `probe` answers from `pg_locks` in one round trip, for keys of both
/// signs, and takes nothing: keys another session holds are `true`, free
/// keys and the prober's own keys `false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_answers_from_pg_locks_in_one_round_trip_and_takes_nothing() {
    let Some(h) = harness().await else { return };
    let keys = keys_of_both_signs("probe", 2);
    let (k1, k2) = (keys[0].clone(), keys[1].clone());
    assert!(k1.id() < 0 && k2.id() >= 0);
    let mut a = open(&h, &unique_name("probe-a")).await;
    let mut b = open(&h, &unique_name("probe-b")).await;
    assert!(a.try_acquire(std::slice::from_ref(&k1)).await.expect("a")[0]);

    let before = b.round_trips();
    let seen = b
        .probe(&[k1.clone(), k2.clone(), k1.clone()])
        .await
        .expect("probe");
    assert_eq!(seen, vec![true, false, true]);
    assert_eq!(b.round_trips() - before, 1, "one round trip");
    assert!(b.held().is_empty(), "a probe records nothing as held");

    let seen = a.probe(&[k1.clone(), k2.clone()]).await.expect("probe");
    assert_eq!(seen, vec![false, false], "own keys and free keys are false");

    let mut raw = h.raw().await;
    assert_eq!(
        keys_held_by(&mut raw, b.backend_pid()).await,
        0,
        "the prober holds no key"
    );
    assert_eq!(
        keys_held_by(&mut raw, a.backend_pid()).await,
        1,
        "the holder holds k1 once (its probe took nothing)"
    );
    let mut c = open(&h, &unique_name("probe-c")).await;
    assert!(
        c.try_acquire(std::slice::from_ref(&k2)).await.expect("c")[0],
        "nothing probed stayed locked"
    );
    assert_eq!(
        b.probe(&[k2.clone(), k1.clone()]).await.expect("probe"),
        vec![true, true]
    );

    // Many keys of both signs, some held elsewhere: still one round trip.
    let many = keys_of_both_signs("probe-many", 40);
    let held: Vec<LockKey> = many.iter().step_by(3).cloned().collect();
    shardlock_contract_tests::take_all(&mut c, &held).await;
    let before = b.round_trips();
    let seen = b.probe(&many).await.expect("probe");
    assert_eq!(b.round_trips() - before, 1);
    let expected: Vec<bool> = (0..many.len()).map(|i| i % 3 == 0).collect();
    assert_eq!(seen, expected);

    // A probe of only the prober's own keys sends nothing.
    let before = c.round_trips();
    assert_eq!(
        c.probe(&held).await.expect("probe"),
        vec![false; held.len()]
    );
    assert_eq!(c.round_trips(), before);
    c.verify().await.expect("verify after probes");

    a.close().await.expect("close");
    b.close().await.expect("close");
    c.close().await.expect("close");
    raw.close().await.expect("close");
}

/// An announced release unlocks and notifies in one round trip; another
/// session's hints wake with the clean keys marked, and the announcer does
/// not hear itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_release_reaches_other_sessions_in_one_round_trip() {
    let Some(h) = harness().await else { return };
    assert_eq!(h.driver().capabilities().release_hint, Support::Native);
    assert_eq!(
        h.driver().capabilities().probe,
        Support::Native,
        "the probe reads pg_locks and takes nothing"
    );
    let keys = unique_keys("announce", 3);
    let (k1, k2, marker) = (keys[0].clone(), keys[1].clone(), keys[2].clone());
    let mut a = open(&h, &unique_name("announce-a")).await;
    let mut b = open(&h, &unique_name("announce-b")).await;
    let (a_hints, b_hints) = (hints_of(&a), hints_of(&b));
    shardlock_contract_tests::take_all(&mut a, &[k1.clone(), k2.clone()]).await;

    let before = a.round_trips();
    let released = tokio::time::timeout(
        Duration::from_secs(20),
        a.release_announced(&[k1.clone(), k2.clone()], &[true, false]),
    )
    .await
    .expect("release_announced hung")
    .expect("release_announced");
    assert_eq!(released, vec![true, true]);
    assert_eq!(
        a.round_trips() - before,
        1,
        "unlock and notify: one round trip"
    );
    assert!(a.held().is_empty());

    clean_arrives(&b_hints, &k1).await;
    assert!(!b_hints.take_clean(&k2), "k2 was not handed over cleanly");
    // The keys were free by the time the hint arrived.
    assert_eq!(
        b.try_acquire(&[k1.clone(), k2.clone()]).await.expect("b"),
        vec![true, true]
    );

    // A's own announcement: A's listener heard it (it listens to the
    // channel) but must have skipped it. A marker B announces after it
    // reaches A later (one listener hears notifications in commit order),
    // so once the marker is there, A's own would have been too.
    assert!(
        b.try_acquire(std::slice::from_ref(&marker))
            .await
            .expect("b")[0]
    );
    let marked = b
        .release_announced(std::slice::from_ref(&marker), &[true])
        .await
        .expect("b announces");
    assert_eq!(marked, vec![true]);
    clean_arrives(&a_hints, &marker).await;
    assert!(
        !a_hints.take_clean(&k1),
        "a session must not record its own announcement"
    );
    assert!(!b_hints.take_clean(&marker), "nor did B hear itself");
    assert!(!a.signals().is_lost() && !b.signals().is_lost());

    a.close().await.expect("close");
    b.close().await.expect("close");
}

/// A release too large for one 8000-byte payload is announced in several
/// notifications of the same statement, and every clean mark arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcements_beyond_one_payload_arrive_complete() {
    let Some(h) = harness().await else { return };
    const N: usize = 1000;
    const { assert!(N > 2 * shardlock_postgres::KEYS_PER_NOTIFICATION) };
    let keys = keys_of_both_signs("announce-many", N);
    let payload: usize = keys.iter().map(|k| k.id().to_string().len() + 2).sum();
    assert!(payload > 8000, "{payload} bytes need several notifications");
    let mut a = open(&h, &unique_name("many-a")).await;
    let b = open(&h, &unique_name("many-b")).await;
    let b_hints = hints_of(&b);
    shardlock_contract_tests::take_all(&mut a, &keys).await;
    // Every other key clean, the last one clean (it closes the last
    // notification, so once it is marked every chunk arrived).
    let clean: Vec<bool> = (0..N).map(|i| i % 2 == 1).collect();
    assert!(clean[N - 1]);
    let before = a.round_trips();
    let released = a.release_announced(&keys, &clean).await.expect("release");
    assert!(released.iter().all(|r| *r));
    assert_eq!(a.round_trips() - before, 1);
    clean_arrives(&b_hints, &keys[N - 1]).await;
    let marked: Vec<bool> = keys.iter().map(|k| b_hints.take_clean(k)).collect();
    let expected: Vec<bool> = (0..N).map(|i| i % 2 == 1 && i != N - 1).collect();
    let wrong: Vec<usize> = (0..N).filter(|i| marked[*i] != expected[*i]).collect();
    assert!(wrong.is_empty(), "marks wrong for keys {wrong:?}");
    a.close().await.expect("close");
    b.close().await.expect("close");
}

/// A release of nothing sends nothing; a release of held and unheld keys
/// names only the released ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcing_a_release_of_nothing_sends_nothing() {
    let Some(h) = harness().await else { return };
    let keys = unique_keys("announce-none", 3);
    let (never, held, marker) = (keys[0].clone(), keys[1].clone(), keys[2].clone());
    let mut a = open(&h, &unique_name("none-a")).await;
    let b = open(&h, &unique_name("none-b")).await;
    let b_hints = hints_of(&b);

    let before = a.round_trips();
    let released = a
        .release_announced(std::slice::from_ref(&never), &[true])
        .await
        .expect("release of nothing");
    assert_eq!(released, vec![false]);
    assert_eq!(a.round_trips(), before, "nothing held: no round trip");

    // Held and unheld keys together: only the held one is named.
    assert!(a.try_acquire(std::slice::from_ref(&held)).await.expect("a")[0]);
    let released = a
        .release_announced(&[never.clone(), held.clone()], &[true, true])
        .await
        .expect("release");
    assert_eq!(released, vec![false, true]);

    // A marker after both: once B has it, anything sent before it arrived.
    assert!(
        a.try_acquire(std::slice::from_ref(&marker))
            .await
            .expect("a")[0]
    );
    let _ = a
        .release_announced(std::slice::from_ref(&marker), &[true])
        .await
        .expect("marker");
    clean_arrives(&b_hints, &marker).await;
    assert!(
        b_hints.take_clean(&held),
        "the held key was announced clean"
    );
    assert!(
        !b_hints.take_clean(&never),
        "a key that was not held is never announced"
    );
    a.close().await.expect("close");
    b.close().await.expect("close");
}

/// One connection per session, read while idle: it hears hints between
/// calls, the server ending it fires the loss signal without a call, and it
/// never reconnects behind the session (a new backend would hold none of
/// its locks); closing the session ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_per_session_read_while_idle() {
    let Some(h) = harness().await else { return };
    let node = unique_name("one-conn");
    let mut a = open(&h, &node).await;
    let mut b = open(&h, &unique_name("one-conn-b")).await;
    let a_hints = hints_of(&a);
    let mut raw = h.raw().await;
    assert_eq!(
        connections_of(&mut raw, &node).await,
        vec![format!("shardlock:{node}")],
        "one connection per session"
    );

    // Idle well past the linger, then calls: the reader gives the
    // connection back each time.
    let keys = unique_keys("one-conn", 2);
    for round in 0..5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            a.try_acquire(std::slice::from_ref(&keys[0]))
                .await
                .expect("a")[0],
            "round {round}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        a.verify().await.expect("verify");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(a.release(&keys[0]).await.expect("release"));
    }

    // A hint announced while `a` is idle arrives without a call of `a`.
    assert!(
        b.try_acquire(std::slice::from_ref(&keys[1]))
            .await
            .expect("b")[0]
    );
    let _ = b
        .release_announced(std::slice::from_ref(&keys[1]), &[true])
        .await
        .expect("announce");
    clean_arrives(&a_hints, &keys[1]).await;

    // The server ends the idle session: the loss signal fires, no call
    // needed, and the session stays lost: no new backend for the node.
    assert!(
        a.try_acquire(std::slice::from_ref(&keys[0]))
            .await
            .expect("a")[0]
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    h.terminate(&a).await;
    tokio::time::timeout(Duration::from_secs(5), a.signals().lost().cancelled())
        .await
        .expect("the loss signal fires while the session is idle");
    let reason = a.signals().reason().unwrap_or_default();
    assert!(reason.contains("ended the session"), "{reason}");
    let err = a.verify().await.expect_err("a lost session cannot verify");
    assert!(matches!(err, Error::SessionLost { .. }), "{err:?}");
    let err = a
        .try_acquire(std::slice::from_ref(&keys[1]))
        .await
        .expect_err("nor take keys");
    assert!(matches!(err, Error::SessionLost { .. }), "{err:?}");
    assert!(
        connections_of(&mut raw, &node).await.is_empty(),
        "no connection was opened behind the lost session"
    );
    free_within(&h, &keys[0], Duration::from_secs(5)).await;
    a.close().await.expect("closing a lost session");

    // Closing a live session ends its connection.
    let node_c = unique_name("one-conn-c");
    let c = open(&h, &node_c).await;
    c.close().await.expect("close");
    let started = Instant::now();
    while !connections_of(&mut raw, &node_c).await.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "connections of a closed session remain: {:?}",
            connections_of(&mut raw, &node_c).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!b.signals().is_lost());
    b.close().await.expect("close");
    raw.close().await.expect("close");
}

/// The last statement `pid` ran, as `pg_stat_activity` shows it.
async fn last_statement(h: &PgHarness, pid: i32) -> String {
    let mut raw = h.raw().await;
    let query: String = sqlx::query_scalar("SELECT query FROM pg_stat_activity WHERE pid = $1")
        .bind(pid)
        .fetch_one(&mut raw)
        .await
        .expect("pg_stat_activity");
    let _ = raw.close().await;
    query
}

/// `verify` reads the lock table on its first call and then at most every
/// `lock_check_interval`; in between it proves the same live process with
/// `SELECT pg_backend_pid()` (a session lock is freed only by its own
/// process). With the interval at zero every verify reads it, and a key
/// unlocked behind the session's back is found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reads_the_lock_table_at_its_interval() {
    let Some(h) = harness().await else { return };
    let keys = unique_keys("light-verify", 3);

    // Default interval (60 s): the first verify is full, the next light.
    let mut a = open(&h, "light").await;
    shardlock_contract_tests::take_all(&mut a, &keys).await;
    a.verify().await.expect("first verify");
    assert!(
        last_statement(&h, a.backend_pid())
            .await
            .contains("pg_locks"),
        "the first verify reads the lock table"
    );
    a.verify().await.expect("second verify");
    assert_eq!(
        last_statement(&h, a.backend_pid()).await,
        "SELECT pg_backend_pid()",
        "a verify within the interval only proves the process"
    );
    a.close().await.expect("close");

    // Interval zero: every verify is full, and finds a key unlocked behind
    // the session's back (through its fenced transaction, which the docs
    // forbid).
    let options = h.options().clone().lock_check_interval(Duration::ZERO);
    let driver = PgDriver::new(options);
    let mut b = driver
        .connect(&h.database(), &NodeId::new("full"))
        .await
        .expect("connect");
    shardlock_contract_tests::take_all(&mut b, &keys).await;
    b.verify().await.expect("first verify");
    b.verify().await.expect("second verify");
    assert!(
        last_statement(&h, b.backend_pid())
            .await
            .contains("pg_locks"),
        "with the interval at zero every verify reads the lock table"
    );
    let mut tx = b.transaction().await.expect("begin");
    let freed: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
        .bind(keys[1].id())
        .fetch_one(&mut *tx)
        .await
        .expect("unlock behind the session's back");
    assert!(freed);
    tx.commit().await.expect("commit");
    match b.verify().await {
        Err(e) => assert!(
            e.to_string().contains("no longer shows")
                || format!("{e:?}").contains("no longer shows"),
            "the missing key is named: {e:?}"
        ),
        Ok(()) => panic!("a full verify must find the key unlocked behind the session's back"),
    }
}
