//! One function per clause of the driver contract (see
//! `shardlock_core::Driver`). Each panics with the actual values on failure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shardlock_core::{
    acquire_leadership, wait_for_leadership, CancellationToken, Driver, Error, LockKey, NodeId,
    Session,
};
use tokio::sync::Barrier;

use crate::harness::{unique_keys, unique_name, Harness};

/// How long an eventually-true condition (a dropped session's locks freed in
/// the background, a waiter woken) may take before the suite calls it broken.
pub const SETTLE: Duration = Duration::from_secs(10);

type SessionOf<H> = <<H as Harness>::Driver as Driver>::Session;

async fn open<H: Harness>(h: &H, node: &str) -> SessionOf<H> {
    let driver = h.driver();
    match driver.connect(&h.database(), &NodeId::new(node)).await {
        Ok(s) => s,
        Err(e) => panic!("connect to {} failed: {e:?}", h.database()),
    }
}

async fn try_one<S: Session>(s: &mut S, key: &LockKey) -> bool {
    match s.try_acquire(std::slice::from_ref(key)).await {
        Ok(v) => {
            assert_eq!(v.len(), 1, "one answer per key, got {v:?}");
            v[0]
        }
        Err(e) => panic!("try_acquire({key}) failed: {e:?}"),
    }
}

/// Takes every key of `keys` in one batch, or panics with the answers.
pub async fn take_all<S: Session>(session: &mut S, keys: &[LockKey]) {
    match session.try_acquire(keys).await {
        Ok(granted) => assert!(
            granted.iter().all(|g| *g),
            "every key must be granted: {granted:?}"
        ),
        Err(e) => panic!("try_acquire of {} keys failed: {e:?}", keys.len()),
    }
}

/// Waits until a fresh session can take `key` (then releases it), or panics
/// after [`SETTLE`]. Returns how long it took.
async fn until_free<H: Harness>(h: &H, key: &LockKey, why: &str) -> Duration {
    let started = Instant::now();
    let mut probe = open(h, "probe").await;
    loop {
        if try_one(&mut probe, key).await {
            let _ = probe.release(key).await;
            let _ = probe.close().await;
            return started.elapsed();
        }
        assert!(
            started.elapsed() < SETTLE,
            "{why}: {key} still held after {SETTLE:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Clause 1: at most one session holds a key; the other is told `false`.
pub async fn clause_1_exclusive<H: Harness>(h: &H) {
    let key = &unique_keys("c1", 1)[0];
    let mut a = open(h, "a").await;
    let mut b = open(h, "b").await;
    assert!(try_one(&mut a, key).await, "a free key is granted");
    assert!(
        !try_one(&mut b, key).await,
        "a held key is denied to another session"
    );
    assert!(!try_one(&mut b, key).await, "denied again, no state change");
    assert_eq!(a.held(), vec![key.clone()], "a knows it holds the key");
    assert!(b.held().is_empty(), "b holds nothing: {:?}", b.held());
    a.close().await.expect("close a");
    b.close().await.expect("close b");
}

/// Clause 1 under contention: many sessions race for the same keys; no key
/// is ever granted to two sessions at once.
pub async fn clause_1_concurrent_race<H: Harness>(h: &H) {
    const SESSIONS: usize = 6;
    const ROUNDS: usize = 5;
    let keys = Arc::new(unique_keys("c1race", 16));
    let barrier = Arc::new(Barrier::new(SESSIONS));
    let mut tasks = Vec::new();
    for i in 0..SESSIONS {
        let mut s = open(h, &format!("racer-{i}")).await;
        let keys = Arc::clone(&keys);
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            let mut wins = vec![Vec::new(); ROUNDS];
            for win in wins.iter_mut() {
                barrier.wait().await;
                let granted = s.try_acquire(&keys).await.expect("try_acquire");
                *win = granted;
                barrier.wait().await;
                s.release_all().await.expect("release_all");
            }
            s.close().await.expect("close");
            wins
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("racer task"));
    }
    for round in 0..ROUNDS {
        for (k, key) in keys.iter().enumerate() {
            let winners = results.iter().filter(|r| r[round][k]).count();
            assert_eq!(
                winners, 1,
                "round {round}: {key} granted to {winners} sessions"
            );
        }
    }
}

/// Clause 2: try-acquire of a held key answers true and does not stack: one
/// release frees it.
pub async fn clause_2_try_acquire_idempotent<H: Harness>(h: &H) {
    let key = &unique_keys("c2", 1)[0];
    let mut a = open(h, "a").await;
    let mut b = open(h, "b").await;
    assert!(try_one(&mut a, key).await);
    assert!(
        try_one(&mut a, key).await,
        "re-acquiring a held key answers true"
    );
    let granted = a
        .try_acquire(&[key.clone(), key.clone()])
        .await
        .expect("dup batch");
    assert_eq!(
        granted,
        vec![true, true],
        "duplicates in a batch answer alike"
    );
    assert_eq!(a.held().len(), 1, "held once: {:?}", a.held());
    assert!(
        a.release(key).await.expect("release"),
        "first release frees"
    );
    assert!(
        try_one(&mut b, key).await,
        "one release was enough: no stacked hold"
    );
    assert!(
        !a.release(key).await.expect("second release"),
        "nothing left to release"
    );
    a.close().await.expect("close");
    b.close().await.expect("close");
}

/// Clause 3: a batch answers each key in order, mixing granted and denied.
pub async fn clause_3_batch<H: Harness>(h: &H) {
    let keys = unique_keys("c3", 200);
    let mut a = open(h, "a").await;
    let mut b = open(h, "b").await;
    let odd: Vec<LockKey> = keys.iter().skip(1).step_by(2).cloned().collect();
    let granted = b.try_acquire(&odd).await.expect("b batch");
    assert!(granted.iter().all(|g| *g), "b gets the odd keys");
    let started = Instant::now();
    let granted = a.try_acquire(&keys).await.expect("a batch");
    let took = started.elapsed();
    assert_eq!(granted.len(), keys.len(), "one answer per key");
    for (i, g) in granted.iter().enumerate() {
        assert_eq!(*g, i % 2 == 0, "key {i} ({}) answered {g}", keys[i]);
    }
    assert_eq!(a.held().len(), 100, "a holds exactly the even keys");
    eprintln!(
        "clause 3: batch of {} keys answered in {took:?}",
        keys.len()
    );
    a.close().await.expect("close");
    b.close().await.expect("close");
}

/// Runs `session.acquire(key)` in a task that hands the session back with
/// the answer.
fn spawn_waiter<S: Session>(
    mut session: S,
    key: &LockKey,
    cancel: &CancellationToken,
) -> tokio::task::JoinHandle<(S, shardlock_core::Result<bool>)> {
    let (key, cancel) = (key.clone(), cancel.clone());
    tokio::spawn(async move {
        let got = session.acquire(&key, &cancel).await;
        (session, got)
    })
}

/// Clause 4: `acquire` waits for a held key and gets it on release.
pub async fn clause_4_acquire_waits<H: Harness>(h: &H) {
    let key = unique_keys("c4", 1).remove(0);
    let mut a = open(h, "a").await;
    let b = open(h, "b").await;
    assert!(try_one(&mut a, &key).await);
    let cancel = CancellationToken::new();
    let waiter = spawn_waiter(b, &key, &cancel);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiter.is_finished(),
        "acquire must wait while the key is held"
    );
    let released_at = Instant::now();
    assert!(a.release(&key).await.expect("release"));
    let (b, got) = tokio::time::timeout(SETTLE, waiter)
        .await
        .expect("waiter woke after release")
        .expect("waiter task");
    let handoff = released_at.elapsed();
    assert!(
        got.expect("acquire ok"),
        "acquire answers true once granted"
    );
    assert_eq!(b.held(), vec![key.clone()]);
    assert!(!try_one(&mut a, &key).await, "b holds it now");
    eprintln!("clause 4: handoff from release to waiter took {handoff:?}");
    b.close().await.expect("close");
    a.close().await.expect("close");
}

/// Clause 4: cancelling a waiting `acquire` answers false and leaves the key
/// not held by the waiter.
pub async fn clause_4_acquire_cancel_safe<H: Harness>(h: &H) {
    let key = unique_keys("c4cancel", 1).remove(0);
    let mut a = open(h, "a").await;
    let b = open(h, "b").await;
    assert!(try_one(&mut a, &key).await);
    let cancel = CancellationToken::new();
    let waiter = spawn_waiter(b, &key, &cancel);
    tokio::time::sleep(Duration::from_millis(150)).await;
    cancel.cancel();
    let (mut b, got) = tokio::time::timeout(SETTLE, waiter)
        .await
        .expect("cancel ends the wait promptly")
        .expect("waiter task");
    assert!(
        !got.expect("cancelled acquire is not an error"),
        "cancelled acquire answers false"
    );
    assert!(
        b.held().is_empty(),
        "nothing held after cancel: {:?}",
        b.held()
    );
    assert!(a.release(&key).await.expect("release"));
    until_free(h, &key, "after a cancelled wait and a release").await;
    // The waiter's session is still usable.
    assert!(
        try_one(&mut b, &key).await,
        "the session works after a cancelled wait"
    );
    b.close().await.expect("close");
    a.close().await.expect("close");
}

/// Clause 4: dropping a waiting `acquire` future leaves the key not held.
pub async fn clause_4_acquire_drop_safe<H: Harness>(h: &H) {
    let key = unique_keys("c4drop", 1).remove(0);
    let mut a = open(h, "a").await;
    let mut b = open(h, "b").await;
    assert!(try_one(&mut a, &key).await);
    let never = CancellationToken::new();
    let dropped = tokio::time::timeout(Duration::from_millis(150), b.acquire(&key, &never)).await;
    assert!(
        dropped.is_err(),
        "acquire must still be waiting: {dropped:?}"
    );
    assert!(a.release(&key).await.expect("release"));
    until_free(h, &key, "after a dropped wait and a release").await;
    drop(b);
    a.close().await.expect("close");
}

/// Clause 5: release frees at once; releasing a key not held answers false.
pub async fn clause_5_release<H: Harness>(h: &H) {
    let keys = unique_keys("c5", 2);
    let (k, other) = (&keys[0], &keys[1]);
    let mut a = open(h, "a").await;
    let mut b = open(h, "b").await;
    assert!(
        !a.release(k).await.expect("release unheld"),
        "release of an unheld key is false"
    );
    assert!(try_one(&mut b, other).await);
    assert!(
        !a.release(other).await.expect("release other's"),
        "cannot release another's key"
    );
    assert!(!try_one(&mut a, other).await, "b still holds its key");
    assert!(try_one(&mut a, k).await);
    assert!(a.release(k).await.expect("release held"));
    assert!(
        try_one(&mut b, k).await,
        "released key is free for others at once"
    );
    assert!(a.held().is_empty());
    a.close().await.expect("close");
    b.close().await.expect("close");
}

/// Clause 5, batched: `release_many` answers per key (held → true, not held
/// or held by another → false) and frees exactly the held ones.
pub async fn clause_5_release_many<H: Harness>(h: &H) {
    let keys = unique_keys("c5many", 4);
    let mut a = open(h, "a").await;
    let mut b = open(h, "b").await;
    take_all(&mut a, &keys[..2]).await;
    assert!(try_one(&mut b, &keys[2]).await);
    let answers = a.release_many(&keys).await.expect("release_many");
    assert_eq!(
        answers,
        vec![true, true, false, false],
        "one answer per key"
    );
    assert!(a.held().is_empty(), "nothing left: {:?}", a.held());
    let granted = b.try_acquire(&keys).await.expect("batch");
    assert_eq!(
        granted,
        vec![true, true, true, true],
        "released keys are free; b keeps its own"
    );
    a.close().await.expect("close");
    b.close().await.expect("close");
}

/// Clause 6: `close` releases every key.
pub async fn clause_6_close_releases<H: Harness>(h: &H) {
    let keys = unique_keys("c6close", 5);
    let mut a = open(h, "a").await;
    take_all(&mut a, &keys).await;
    a.close().await.expect("close");
    let mut b = open(h, "b").await;
    let granted = b.try_acquire(&keys).await.expect("batch");
    assert!(
        granted.iter().all(|g| *g),
        "closed session's keys are free: {granted:?}"
    );
    b.close().await.expect("close");
}

/// Clause 6: dropping a session releases every key, without blocking.
pub async fn clause_6_drop_releases<H: Harness>(h: &H) {
    let keys = unique_keys("c6drop", 3);
    let mut a = open(h, "a").await;
    take_all(&mut a, &keys).await;
    let started = Instant::now();
    drop(a);
    let drop_took = started.elapsed();
    assert!(
        drop_took < Duration::from_millis(500),
        "drop must not block: took {drop_took:?}"
    );
    for key in &keys {
        until_free(h, key, "after drop").await;
    }
}

/// Clause 6: dropping a session inside a current-thread runtime works (no
/// panic, no block) and its keys are freed.
pub async fn clause_6_drop_on_current_thread_runtime<H: Harness>(h: &H) {
    let keys = unique_keys("c6ct", 2);
    let driver = h.driver();
    let db = h.database();
    let held = keys.clone();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut s = driver
                .connect(&db, &NodeId::new("ct"))
                .await
                .expect("connect");
            take_all(&mut s, &held).await;
            drop(s);
            // Give a spawned unlock a chance to run before the runtime ends.
            tokio::time::sleep(Duration::from_millis(50)).await;
        });
    });
    let joined = tokio::task::spawn_blocking(move || thread.join())
        .await
        .expect("join");
    assert!(
        joined.is_ok(),
        "dropping a session on a current-thread runtime panicked"
    );
    for key in &keys {
        until_free(h, key, "after drop on a current-thread runtime").await;
    }
}

/// Clause 7: keys are independent.
pub async fn clause_7_independent_keys<H: Harness>(h: &H) {
    let keys = unique_keys("c7", 2);
    let mut a = open(h, "a").await;
    let mut b = open(h, "b").await;
    assert!(try_one(&mut a, &keys[0]).await);
    assert!(try_one(&mut b, &keys[1]).await, "a different key is free");
    assert!(a.release(&keys[0]).await.expect("release"));
    assert!(
        !try_one(&mut a, &keys[1]).await,
        "releasing one key does not free another"
    );
    a.close().await.expect("close");
    b.close().await.expect("close");
}

/// Clause 8: `verify` passes while locks are held and fails once the server
/// ended the session; its keys are then free for others.
pub async fn clause_8_verify_detects_loss<H: Harness>(h: &H) {
    let keys = unique_keys("c8", 3);
    let mut a = open(h, "a").await;
    a.verify().await.expect("verify with no locks");
    take_all(&mut a, &keys).await;
    a.verify().await.expect("verify while holding");
    h.terminate(&a).await;
    let deadline = Instant::now() + SETTLE;
    loop {
        match a.verify().await {
            Err(e) => {
                assert!(
                    e.is_session_fatal(),
                    "loss must be reported as session-fatal: {e:?}"
                );
                break;
            }
            Ok(()) => assert!(
                Instant::now() < deadline,
                "verify still passes {SETTLE:?} after termination"
            ),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for key in &keys {
        until_free(h, key, "after the server ended the session").await;
    }
}

/// Clause 9: a process killed hard loses its keys; prints how long until
/// another session got them.
pub async fn clause_9_crash_releases<H: Harness>(h: &H) {
    let keys = unique_keys("c9", 3);
    let holder = match h.spawn_holder(keys.clone()).await {
        Ok(holder) => holder,
        Err(e) => panic!("could not start a holder process: {e}"),
    };
    let mut b = open(h, "b").await;
    let granted = b.try_acquire(&keys).await.expect("batch");
    assert!(
        granted.iter().all(|g| !*g),
        "the holder holds every key: {granted:?}"
    );
    let cancel = CancellationToken::new();
    let killed_at = Instant::now();
    holder.kill();
    let got = tokio::time::timeout(SETTLE, b.acquire(&keys[0], &cancel))
        .await
        .expect("takeover after a crash within the settle time")
        .expect("acquire");
    assert!(got);
    let takeover = killed_at.elapsed();
    let rest = b.try_acquire(&keys).await.expect("batch");
    assert!(
        rest.iter().all(|g| *g),
        "all keys free after the crash: {rest:?}"
    );
    eprintln!("clause 9: crash takeover took {takeover:?}");
    b.close().await.expect("close");
}

/// Clause 10: failures are typed errors; "not granted" is a value; a dead
/// session reports a session-fatal error rather than `false`.
pub async fn clause_10_typed_errors<H: Harness>(h: &H) {
    let key = &unique_keys("c10", 1)[0];
    let mut a = open(h, "a").await;
    let mut b = open(h, "b").await;
    assert!(try_one(&mut a, key).await);
    assert!(!try_one(&mut b, key).await, "not granted is Ok(false)");
    h.terminate(&b).await;
    let deadline = Instant::now() + SETTLE;
    let err = loop {
        match b.try_acquire(std::slice::from_ref(key)).await {
            Err(e) => break e,
            Ok(v) => {
                assert!(
                    Instant::now() < deadline,
                    "a terminated session still answers {v:?}"
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    };
    assert!(
        err.is_session_fatal(),
        "a dead connection is session-fatal: {err:?}"
    );
    assert!(
        matches!(LockKey::new(""), Err(Error::InvalidLockName { .. })),
        "empty names are typed errors"
    );
    a.close().await.expect("close");
}

/// Unicode, quotes, SQL-looking and maximum-length names lock like any other.
pub async fn hostile_names<H: Harness>(h: &H) {
    let base = unique_name("hostile");
    let names = [
        format!("{base}-'; DROP TABLE x; --"),
        format!("{base}-\"quoted\" \\ back\\slash"),
        format!("{base}-日本語-🦀-\u{202e}rtl"),
        format!("{base}-{}", "é".repeat(480)),
        format!("{base}-tab\there\nnewline"),
    ];
    let keys: Vec<LockKey> = names
        .iter()
        .map(|n| LockKey::new(n.clone()).expect("valid"))
        .collect();
    let mut a = open(h, "a").await;
    let mut b = open(h, "b").await;
    take_all(&mut a, &keys).await;
    let denied = b.try_acquire(&keys).await.expect("batch");
    assert!(
        denied.iter().all(|g| !*g),
        "hostile names exclude like others: {denied:?}"
    );
    a.verify().await.expect("verify");
    for key in &keys {
        assert!(a.release(key).await.expect("release"), "release {key:?}");
    }
    let granted = b.try_acquire(&keys).await.expect("batch");
    assert!(granted.iter().all(|g| *g));
    a.close().await.expect("close");
    b.close().await.expect("close");
}

/// Leader election: the non-blocking form reports `LockNotAcquired`; a
/// standby waiting in the database takes over on graceful release.
pub async fn leadership_handoff<H: Harness>(h: &H) {
    let key = unique_keys("leader", 1).remove(0);
    let db = h.database();
    let (da, db_b) = (h.driver(), h.driver());
    let leader = acquire_leadership(&da, &db, &NodeId::new("a"), key.clone())
        .await
        .expect("first leader");
    match acquire_leadership(&db_b, &db, &NodeId::new("b"), key.clone()).await {
        Err(Error::LockNotAcquired { name }) => assert_eq!(name, key.name()),
        other => panic!("second leader must get LockNotAcquired, got {other:?}"),
    }
    let cancel = CancellationToken::new();
    let standby = {
        let (driver, db, key, cancel) = (db_b.clone(), db.clone(), key.clone(), cancel.clone());
        tokio::spawn(async move {
            let guard = wait_for_leadership(&driver, &db, &NodeId::new("b"), key, &cancel).await;
            (guard, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !standby.is_finished(),
        "the standby waits while a leader holds the key"
    );
    let released = Instant::now();
    leader.release().await.expect("release leadership");
    let (guard, took_over) = tokio::time::timeout(SETTLE, standby)
        .await
        .expect("standby took over")
        .expect("task");
    let guard = guard.expect("wait ok").expect("granted");
    eprintln!(
        "leadership: graceful handoff took {:?}",
        took_over.saturating_duration_since(released)
    );
    // A cancelled standby leaves nothing held.
    let cancel2 = CancellationToken::new();
    cancel2.cancel();
    let none = wait_for_leadership(&da, &db, &NodeId::new("c"), key.clone(), &cancel2)
        .await
        .expect("cancelled wait");
    assert!(none.is_none(), "a cancelled standby gets no guard");
    guard.release().await.expect("release");
    cancel.cancel();
}
