//! One function per clause of the driver contract (see
//! `shardlock_core::Driver`). Each panics with the actual values on failure,
//! and every await is under a hang guard ([`within`]) so a broken driver
//! fails a clause with a message instead of hanging it.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use shardlock_core::{
    acquire_leadership, wait_for_leadership, CancellationToken, Driver, Error, ErrorKind,
    InvalidName, LockKey, NodeId, ReleaseHints, Session, MAX_NAME_LEN,
};
use tokio::sync::Barrier;
use tokio::task::JoinHandle;

use crate::harness::{unique_keys, unique_name, within, Harness, SessionOf};

/// How long clause 4 waits after the holder's release before probing: a
/// wait that was cancelled or dropped but is still queued in the server
/// would be granted at the release, and must get the time to show.
const ABANDONED_GRACE: Duration = Duration::from_millis(100);

/// The hang guard of [`take_all`], which has no harness to ask.
const TAKE_ALL_GUARD: Duration = Duration::from_secs(60);

async fn open<H: Harness>(h: &H, node: &str) -> SessionOf<H> {
    let driver = h.driver();
    let db = h.database();
    let what = format!("connect to {db} as {node}");
    match within(h.settle(), what, driver.connect(&db, &NodeId::new(node))).await {
        Ok(s) => s,
        Err(e) => panic!("connect to {db} failed: {e:?}"),
    }
}

async fn close<H: Harness>(h: &H, session: SessionOf<H>, who: &str) {
    let what = format!("close of session {who}");
    if let Err(e) = within(h.settle(), &what, session.close()).await {
        panic!("{what} failed: {e:?}");
    }
}

async fn try_one<H: Harness>(h: &H, s: &mut SessionOf<H>, key: &LockKey) -> bool {
    let what = format!("try_acquire({key})");
    match within(h.settle(), &what, s.try_acquire(std::slice::from_ref(key))).await {
        Ok(v) => {
            assert_eq!(v.len(), 1, "one answer per key, got {v:?}");
            v[0]
        }
        Err(e) => panic!("{what} failed: {e:?}"),
    }
}

async fn release<H: Harness>(h: &H, s: &mut SessionOf<H>, key: &LockKey) -> bool {
    let what = format!("release({key})");
    match within(h.settle(), &what, s.release(key)).await {
        Ok(v) => v,
        Err(e) => panic!("{what} failed: {e:?}"),
    }
}

async fn batch<H: Harness>(h: &H, s: &mut SessionOf<H>, keys: &[LockKey]) -> Vec<bool> {
    let what = format!("try_acquire of {} keys", keys.len());
    match within(h.settle(), &what, s.try_acquire(keys)).await {
        Ok(v) => {
            assert_eq!(v.len(), keys.len(), "one answer per key, got {v:?}");
            v
        }
        Err(e) => panic!("{what} failed: {e:?}"),
    }
}

/// Takes every key of `keys` in one batch, or panics with the answers.
pub async fn take_all<S: Session>(session: &mut S, keys: &[LockKey]) {
    let what = format!("try_acquire of {} keys", keys.len());
    match within(TAKE_ALL_GUARD, &what, session.try_acquire(keys)).await {
        Ok(granted) => assert!(
            granted.iter().all(|g| *g),
            "every key must be granted: {granted:?}"
        ),
        Err(e) => panic!("{what} failed: {e:?}"),
    }
}

/// Waits until a fresh session can take `key` (then releases it), or panics
/// after [`Harness::settle`]. Returns how long it took.
async fn until_free<H: Harness>(h: &H, key: &LockKey, why: &str) -> Duration {
    let started = Instant::now();
    let settle = h.settle();
    let mut probe = open(h, "probe").await;
    loop {
        if try_one(h, &mut probe, key).await {
            let _ = within(settle, "probe release", probe.release(key)).await;
            let _ = within(settle, "probe close", probe.close()).await;
            return started.elapsed();
        }
        assert!(
            started.elapsed() < settle,
            "{why}: {key} still held after {settle:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The change of a round-trip counter between two readings.
fn trips(before: Option<u64>, after: Option<u64>) -> Option<u64> {
    let (before, after) = (before?, after?);
    assert!(
        after >= before,
        "the round-trip counter went backwards: {before} then {after}"
    );
    Some(after - before)
}

/// Waits until the harness sees `waiter` waiting in the server for `key`
/// (or, for a harness that cannot look, a short grace period, said loudly).
/// Panics when the waiter returns before: it was supposed to wait.
async fn until_waiting<H: Harness, T: std::fmt::Debug>(
    h: &H,
    key: &LockKey,
    waiter: &mut JoinHandle<(SessionOf<H>, T)>,
    what: &str,
) {
    let seen = within(
        h.settle() + h.slack(),
        format!("{what}: seeing the waiter"),
        async {
            tokio::select! {
                seen = h.wait_until_waiting(key) => seen,
                done = &mut *waiter => panic!(
                    "{what}: acquire({key}) returned instead of waiting: {:?}",
                    done.map(|(_, answer)| answer)
                ),
            }
        },
    )
    .await;
    report_unseen(h, seen, what);
}

fn report_unseen<H: Harness>(h: &H, seen: bool, what: &str) {
    if !seen {
        eprintln!(
            "NOT SEEN: {what}: the {} harness cannot see waiters in the server, so the wait is \
             assumed to have started after {:?}; implement Harness::wait_until_waiting",
            h.driver().name(),
            crate::harness::UNOBSERVED_WAIT
        );
    }
}

/// Clause 1: at most one session holds a key; the other is told `false`.
pub async fn clause_1_exclusive<H: Harness>(h: &H) {
    let key = &unique_keys("c1", 1)[0];
    let mut a = open(h, "a").await;
    let mut b = open(h, "b").await;
    assert!(try_one(h, &mut a, key).await, "a free key is granted");
    assert!(
        !try_one(h, &mut b, key).await,
        "a held key is denied to another session"
    );
    assert!(
        !try_one(h, &mut b, key).await,
        "denied again, no state change"
    );
    assert_eq!(a.held(), vec![key.clone()], "a knows it holds the key");
    assert!(b.held().is_empty(), "b holds nothing: {:?}", b.held());
    close(h, a, "a").await;
    close(h, b, "b").await;
}

/// Clause 1 under contention: many sessions race for the same keys; no key
/// is ever granted to two sessions at once.
pub async fn clause_1_concurrent_race<H: Harness>(h: &H) {
    const SESSIONS: usize = 6;
    const ROUNDS: usize = 5;
    let keys = Arc::new(unique_keys("c1race", 16));
    let barrier = Arc::new(Barrier::new(SESSIONS));
    let settle = h.settle();
    let mut tasks = Vec::new();
    for i in 0..SESSIONS {
        let mut s = open(h, &format!("racer-{i}")).await;
        let keys = Arc::clone(&keys);
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            let mut wins = vec![Vec::new(); ROUNDS];
            for (round, win) in wins.iter_mut().enumerate() {
                within(
                    settle,
                    format!("racer {i}: barrier of round {round}"),
                    barrier.wait(),
                )
                .await;
                let granted = within(settle, "racer try_acquire", s.try_acquire(&keys))
                    .await
                    .expect("try_acquire");
                *win = granted;
                within(
                    settle,
                    format!("racer {i}: second barrier of round {round}"),
                    barrier.wait(),
                )
                .await;
                within(settle, "racer release_all", s.release_all())
                    .await
                    .expect("release_all");
            }
            within(settle, "racer close", s.close())
                .await
                .expect("close");
            wins
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(
            within(settle * 2, "a racer task", t)
                .await
                .expect("racer task"),
        );
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
    assert!(try_one(h, &mut a, key).await);
    assert!(
        try_one(h, &mut a, key).await,
        "re-acquiring a held key answers true"
    );
    let granted = batch(h, &mut a, &[key.clone(), key.clone()]).await;
    assert_eq!(
        granted,
        vec![true, true],
        "duplicates in a batch answer alike"
    );
    assert_eq!(a.held().len(), 1, "held once: {:?}", a.held());
    assert!(release(h, &mut a, key).await, "first release frees");
    assert!(
        try_one(h, &mut b, key).await,
        "one release was enough: no stacked hold"
    );
    assert!(!release(h, &mut a, key).await, "nothing left to release");
    close(h, a, "a").await;
    close(h, b, "b").await;
}

/// Clause 2 (and the cancel-safety note of `try_acquire`): a `try_acquire`
/// future dropped while its round trip is in flight poisons the session:
/// `verify` then fails session-fatally and the loss signal has fired; the
/// session's keys are freed once it is dropped.
pub async fn clause_2_dropped_try_acquire_poisons<H: Harness>(h: &H) {
    let keys = unique_keys("c2drop", 3);
    let mut a = open(h, "a").await;
    let signals = a.signals();
    let first_poll = {
        let mut call = pin!(a.try_acquire(&keys));
        call.as_mut().poll(&mut Context::from_waker(Waker::noop()))
        // The future is dropped here, mid-flight when it was pending.
    };
    match first_poll {
        Poll::Pending => {
            let verified =
                within(h.settle(), "verify after a dropped try_acquire", a.verify()).await;
            match verified {
                Ok(()) => panic!(
                    "verify passed after a try_acquire was dropped mid-round-trip: the session \
                     must be poisoned, its locks are unknown (held: {:?})",
                    a.held()
                ),
                Err(e) => assert!(
                    e.is_session_fatal(),
                    "a poisoned session fails session-fatally: {e:?}"
                ),
            }
            assert!(
                signals.is_lost(),
                "a poisoned session fires its loss signal: {signals:?}"
            );
            let again = within(
                h.settle(),
                "try_acquire on a poisoned session",
                a.try_acquire(&keys),
            )
            .await;
            assert!(
                again.as_ref().is_err_and(Error::is_session_fatal),
                "poisoning is final: {again:?}"
            );
            eprintln!(
                "clause 2: dropped try_acquire poisoned the session: {:?}",
                signals.reason()
            );
            // Whatever the server granted is freed with the session.
            drop(a);
            for key in &keys {
                until_free(h, key, "after dropping a poisoned session").await;
            }
        }
        Poll::Ready(answer) => {
            eprintln!(
                "clause 2: the {} driver answered try_acquire on its first poll (no round trip \
                 in flight to interrupt); checking the held keys instead",
                h.driver().name()
            );
            let granted = match answer {
                Ok(granted) => granted,
                Err(e) => panic!("try_acquire of fresh keys failed: {e:?}"),
            };
            assert_eq!(granted, vec![true; keys.len()], "fresh keys are granted");
            let mut held: Vec<i64> = a.held().iter().map(LockKey::id).collect();
            let mut want: Vec<i64> = keys.iter().map(LockKey::id).collect();
            held.sort_unstable();
            want.sort_unstable();
            assert_eq!(held, want, "held() is exactly the granted keys");
            within(h.settle(), "verify", a.verify())
                .await
                .expect("verify after a completed try_acquire");
            assert!(
                !signals.is_lost(),
                "a healthy session is not lost: {signals:?}"
            );
            let mut b = open(h, "b").await;
            let denied = batch(h, &mut b, &keys).await;
            assert!(
                denied.iter().all(|g| !*g),
                "the server shows a's keys: {denied:?}"
            );
            close(h, a, "a").await;
            close(h, b, "b").await;
        }
    }
}

/// Clause 3: a batch answers each key in order, mixing granted and denied,
/// in **one** round trip; a batch of keys the session already holds costs
/// none. Counted with [`Harness::round_trips`].
pub async fn clause_3_batch<H: Harness>(h: &H) {
    let keys = unique_keys("c3", 200);
    let fresh = unique_keys("c3fresh", 50);
    let mut a = open(h, "a").await;
    let mut b = open(h, "b").await;
    let odd: Vec<LockKey> = keys.iter().skip(1).step_by(2).cloned().collect();
    let even: Vec<LockKey> = keys.iter().step_by(2).cloned().collect();
    let granted = batch(h, &mut b, &odd).await;
    assert!(granted.iter().all(|g| *g), "b gets the odd keys");
    let counted = h.round_trips(&a).is_some();
    if !counted {
        eprintln!(
            "NOT COUNTED: clause 3: the {} harness cannot count round trips, so \"one round trip \
             per batch\" is not proven here; checking the answers only (implement \
             Harness::round_trips)",
            h.driver().name()
        );
    }

    // 200 keys, 100 free and 100 held by b: one round trip.
    let before = h.round_trips(&a);
    let started = Instant::now();
    let granted = batch(h, &mut a, &keys).await;
    let took = started.elapsed();
    let mixed_trips = trips(before, h.round_trips(&a));
    for (i, g) in granted.iter().enumerate() {
        assert_eq!(*g, i % 2 == 0, "key {i} ({}) answered {g}", keys[i]);
    }
    assert_eq!(a.held().len(), 100, "a holds exactly the even keys");
    if let Some(n) = mixed_trips {
        assert_eq!(
            n, 1,
            "a batch of 200 keys (100 free, 100 held elsewhere) must cost one round trip, cost {n}"
        );
    }

    // Only keys a holds (each twice): no round trip, all true.
    let held_twice: Vec<LockKey> = even.iter().chain(even.iter()).cloned().collect();
    let before = h.round_trips(&a);
    let granted = batch(h, &mut a, &held_twice).await;
    let held_trips = trips(before, h.round_trips(&a));
    assert!(
        granted.iter().all(|g| *g),
        "held keys answer true: {granted:?}"
    );
    if let Some(n) = held_trips {
        assert_eq!(
            n, 0,
            "a batch of keys the session already holds needs no round trip, cost {n}"
        );
    }

    // Held and fresh keys together: one round trip, for the fresh ones.
    let mixed: Vec<LockKey> = even[..10].iter().chain(fresh.iter()).cloned().collect();
    let before = h.round_trips(&a);
    let granted = batch(h, &mut a, &mixed).await;
    let fresh_trips = trips(before, h.round_trips(&a));
    assert!(granted.iter().all(|g| *g), "all granted: {granted:?}");
    assert_eq!(a.held().len(), 150, "no key held twice: {}", a.held().len());
    if let Some(n) = fresh_trips {
        assert_eq!(
            n, 1,
            "10 held + 50 fresh keys must cost one round trip, cost {n}"
        );
    }
    eprintln!(
        "clause 3: batch of {} keys answered in {took:?}; round trips: mixed batch {}, held-only \
         batch {}, held+fresh batch {}",
        keys.len(),
        shown(mixed_trips),
        shown(held_trips),
        shown(fresh_trips),
    );
    close(h, a, "a").await;
    close(h, b, "b").await;
}

fn shown(n: Option<u64>) -> String {
    n.map_or_else(|| "not counted".to_string(), |n| n.to_string())
}

/// Runs `session.acquire(key)` in a task that hands the session back with
/// the answer.
fn spawn_waiter<S: Session>(
    mut session: S,
    key: &LockKey,
    cancel: &CancellationToken,
) -> JoinHandle<(S, shardlock_core::Result<bool>)> {
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
    assert!(try_one(h, &mut a, &key).await);
    let cancel = CancellationToken::new();
    let mut waiter = spawn_waiter(b, &key, &cancel);
    until_waiting(h, &key, &mut waiter, "clause 4 (waits)").await;
    assert!(
        !waiter.is_finished(),
        "acquire must wait while the key is held"
    );
    let released_at = Instant::now();
    assert!(release(h, &mut a, &key).await);
    let (b, got) = within(h.settle(), "the waiter after release", waiter)
        .await
        .expect("waiter task");
    let handoff = released_at.elapsed();
    assert!(
        got.expect("acquire ok"),
        "acquire answers true once granted"
    );
    assert_eq!(b.held(), vec![key.clone()]);
    assert!(!try_one(h, &mut a, &key).await, "b holds it now");
    eprintln!("clause 4: handoff from release to waiter took {handoff:?}");
    close(h, b, "b").await;
    close(h, a, "a").await;
}

/// Clause 4: cancelling an `acquire` that waits in the server answers false
/// and leaves the key not held by the waiter.
pub async fn clause_4_acquire_cancel_safe<H: Harness>(h: &H) {
    let key = unique_keys("c4cancel", 1).remove(0);
    let mut a = open(h, "a").await;
    let b = open(h, "b").await;
    assert!(try_one(h, &mut a, &key).await);
    let cancel = CancellationToken::new();
    let mut waiter = spawn_waiter(b, &key, &cancel);
    until_waiting(h, &key, &mut waiter, "clause 4 (cancel)").await;
    cancel.cancel();
    let (mut b, got) = within(h.settle(), "the cancelled waiter", waiter)
        .await
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
    assert!(release(h, &mut a, &key).await);
    tokio::time::sleep(ABANDONED_GRACE).await;
    until_free(h, &key, "after a cancelled wait and a release").await;
    // The waiter's session is still usable.
    assert!(
        try_one(h, &mut b, &key).await,
        "the session works after a cancelled wait"
    );
    close(h, b, "b").await;
    close(h, a, "a").await;
}

/// Clause 4: dropping an `acquire` future that waits in the server leaves
/// the key not held.
pub async fn clause_4_acquire_drop_safe<H: Harness>(h: &H) {
    let key = unique_keys("c4drop", 1).remove(0);
    let mut a = open(h, "a").await;
    let mut b = open(h, "b").await;
    assert!(try_one(h, &mut a, &key).await);
    let never = CancellationToken::new();
    let (answered, seen) = {
        let mut acquire = pin!(b.acquire(&key, &never));
        within(
            h.settle() + h.slack(),
            "clause 4 (drop): seeing the waiter",
            async {
                tokio::select! {
                    got = &mut acquire => (Some(got), false),
                    seen = h.wait_until_waiting(&key) => (None, seen),
                }
            },
        )
        .await
        // The waiting future is dropped here.
    };
    assert!(
        answered.is_none(),
        "acquire must still be waiting: {answered:?}"
    );
    report_unseen(h, seen, "clause 4 (drop)");
    assert!(
        !b.held().contains(&key),
        "a dropped wait holds nothing: {:?}",
        b.held()
    );
    assert!(release(h, &mut a, &key).await);
    tokio::time::sleep(ABANDONED_GRACE).await;
    until_free(h, &key, "after a dropped wait and a release").await;
    drop(b);
    close(h, a, "a").await;
}

/// Clause 5: release frees at once; releasing a key not held answers false.
pub async fn clause_5_release<H: Harness>(h: &H) {
    let keys = unique_keys("c5", 2);
    let (k, other) = (&keys[0], &keys[1]);
    let mut a = open(h, "a").await;
    let mut b = open(h, "b").await;
    assert!(
        !release(h, &mut a, k).await,
        "release of an unheld key is false"
    );
    assert!(try_one(h, &mut b, other).await);
    assert!(
        !release(h, &mut a, other).await,
        "cannot release another's key"
    );
    assert!(!try_one(h, &mut a, other).await, "b still holds its key");
    assert!(try_one(h, &mut a, k).await);
    assert!(release(h, &mut a, k).await);
    assert!(
        try_one(h, &mut b, k).await,
        "released key is free for others at once"
    );
    assert!(a.held().is_empty());
    close(h, a, "a").await;
    close(h, b, "b").await;
}

/// Clause 5, batched: `release_many` answers per key (held → true, not held
/// or held by another → false) and frees exactly the held ones.
pub async fn clause_5_release_many<H: Harness>(h: &H) {
    let keys = unique_keys("c5many", 4);
    let mut a = open(h, "a").await;
    let mut b = open(h, "b").await;
    take_all(&mut a, &keys[..2]).await;
    assert!(try_one(h, &mut b, &keys[2]).await);
    let answers = within(h.settle(), "release_many", a.release_many(&keys))
        .await
        .expect("release_many");
    assert_eq!(
        answers,
        vec![true, true, false, false],
        "one answer per key"
    );
    assert!(a.held().is_empty(), "nothing left: {:?}", a.held());
    let granted = batch(h, &mut b, &keys).await;
    assert_eq!(
        granted,
        vec![true, true, true, true],
        "released keys are free; b keeps its own"
    );
    close(h, a, "a").await;
    close(h, b, "b").await;
}

/// Clause 6: `close` releases every key.
pub async fn clause_6_close_releases<H: Harness>(h: &H) {
    let keys = unique_keys("c6close", 5);
    let mut a = open(h, "a").await;
    take_all(&mut a, &keys).await;
    close(h, a, "a").await;
    let mut b = open(h, "b").await;
    let granted = batch(h, &mut b, &keys).await;
    assert!(
        granted.iter().all(|g| *g),
        "closed session's keys are free: {granted:?}"
    );
    close(h, b, "b").await;
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
    let settle = h.settle();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut s = within(settle, "connect", driver.connect(&db, &NodeId::new("ct")))
                .await
                .expect("connect");
            take_all(&mut s, &held).await;
            drop(s);
            // Give a spawned unlock a chance to run before the runtime ends.
            tokio::time::sleep(Duration::from_millis(50)).await;
        });
    });
    let joined = within(
        settle * 2,
        "the current-thread runtime's thread",
        tokio::task::spawn_blocking(move || thread.join()),
    )
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
    assert!(try_one(h, &mut a, &keys[0]).await);
    assert!(
        try_one(h, &mut b, &keys[1]).await,
        "a different key is free"
    );
    assert!(release(h, &mut a, &keys[0]).await);
    assert!(
        !try_one(h, &mut a, &keys[1]).await,
        "releasing one key does not free another"
    );
    close(h, a, "a").await;
    close(h, b, "b").await;
}

/// Clause 8: `verify` passes while locks are held and fails once the server
/// ended the session; its keys are then free for others.
pub async fn clause_8_verify_detects_loss<H: Harness>(h: &H) {
    let keys = unique_keys("c8", 3);
    let settle = h.settle();
    let mut a = open(h, "a").await;
    within(settle, "verify", a.verify())
        .await
        .expect("verify with no locks");
    take_all(&mut a, &keys).await;
    within(settle, "verify", a.verify())
        .await
        .expect("verify while holding");
    within(settle, "terminate", h.terminate(&a)).await;
    let deadline = Instant::now() + settle;
    loop {
        match within(settle, "verify after terminate", a.verify()).await {
            Err(e) => {
                assert!(
                    e.is_session_fatal(),
                    "loss must be reported as session-fatal: {e:?}"
                );
                break;
            }
            Ok(()) => assert!(
                Instant::now() < deadline,
                "verify still passes {settle:?} after termination"
            ),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for key in &keys {
        until_free(h, key, "after the server ended the session").await;
    }
}

/// Clause 8, the signal: when the server ends a session, its
/// `signals().lost()` token fires by itself (no statement sent) within the
/// driver's stated `capabilities().loss_detection_bound` (times
/// [`Harness::loss_bound_factor`]); then `verify` fails and another session
/// takes the key. Prints the measured time and the bound.
pub async fn clause_8_loss_signalled<H: Harness>(h: &H) {
    let driver = h.driver();
    let caps = driver.capabilities();
    let Some(bound) = caps.loss_detection_bound else {
        panic!(
            "the {} driver states no loss signal (capabilities: {caps:?}); clause 8 requires one \
             with a loss_detection_bound",
            driver.name()
        );
    };
    assert!(
        caps.loss_signal.is_supported(),
        "a loss_detection_bound without a loss signal: {caps:?}"
    );
    let key = unique_keys("c8signal", 1).remove(0);
    let settle = h.settle();
    let mut a = open(h, "a").await;
    assert!(try_one(h, &mut a, &key).await);
    let signals = a.signals();
    assert!(
        !signals.is_lost(),
        "a healthy session is not lost: {signals:?}"
    );
    let limit = bound.mul_f64(h.loss_bound_factor());
    let guard = limit + settle;
    let asked = Instant::now();
    within(settle, "terminate", h.terminate(&a)).await;
    let terminated = Instant::now();
    // No call on `a` until the signal fired: it must come by itself.
    let fired = tokio::time::timeout(guard, signals.lost().cancelled()).await;
    let took = terminated.elapsed();
    assert!(
        fired.is_ok(),
        "the {} driver's loss signal did not fire within {guard:?} after the server ended the \
         session (stated bound {bound:?}); it must fire without waiting for a statement",
        driver.name()
    );
    eprintln!(
        "clause 8: loss signalled {took:?} after the server ended the session (terminate took \
         {:?}); stated bound {bound:?}, allowed {limit:?}; reason: {:?}",
        terminated - asked,
        signals.reason()
    );
    assert!(
        took <= limit,
        "the loss signal took {took:?}, over the stated bound {bound:?} × {} = {limit:?}",
        h.loss_bound_factor()
    );
    let verified = within(settle, "verify after the loss signal", a.verify()).await;
    assert!(
        verified.as_ref().is_err_and(Error::is_session_fatal),
        "verify of a signalled-lost session fails session-fatally: {verified:?}"
    );
    until_free(h, &key, "after the loss signal").await;
    drop(a);
}

/// Clause 9: a process killed hard loses its keys; prints how long until
/// another session got them.
pub async fn clause_9_crash_releases<H: Harness>(h: &H) {
    let keys = unique_keys("c9", 3);
    let settle = h.settle();
    let holder = match within(
        settle * 3,
        "starting a holder",
        h.spawn_holder(keys.clone()),
    )
    .await
    {
        Ok(holder) => holder,
        Err(e) => panic!("could not start a holder process: {e}"),
    };
    let mut b = open(h, "b").await;
    let granted = batch(h, &mut b, &keys).await;
    assert!(
        granted.iter().all(|g| !*g),
        "the holder holds every key: {granted:?}"
    );
    let cancel = CancellationToken::new();
    let killed_at = Instant::now();
    holder.kill();
    let got = within(
        settle,
        "takeover after a crash",
        b.acquire(&keys[0], &cancel),
    )
    .await
    .expect("acquire");
    assert!(got);
    let takeover = killed_at.elapsed();
    let rest = batch(h, &mut b, &keys).await;
    assert!(
        rest.iter().all(|g| *g),
        "all keys free after the crash: {rest:?}"
    );
    eprintln!("clause 9: crash takeover took {takeover:?}");
    close(h, b, "b").await;
}

/// Clause 10: failures are typed errors; "not granted" is a value; a dead
/// session reports a session-fatal error rather than `false`; invalid names
/// are typed errors.
pub async fn clause_10_typed_errors<H: Harness>(h: &H) {
    let key = &unique_keys("c10", 1)[0];
    let settle = h.settle();
    let mut a = open(h, "a").await;
    let mut b = open(h, "b").await;
    assert!(try_one(h, &mut a, key).await);
    assert!(!try_one(h, &mut b, key).await, "not granted is Ok(false)");
    within(settle, "terminate", h.terminate(&b)).await;
    let deadline = Instant::now() + settle;
    let err = loop {
        let what = "try_acquire on a terminated session";
        match within(settle, what, b.try_acquire(std::slice::from_ref(key))).await {
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
    let too_long = "k".repeat(MAX_NAME_LEN + 1);
    for (name, want) in [
        ("", InvalidName::Empty),
        ("nul\0inside", InvalidName::Nul),
        (
            too_long.as_str(),
            InvalidName::TooLong {
                len: MAX_NAME_LEN + 1,
                max: MAX_NAME_LEN,
            },
        ),
    ] {
        match LockKey::new(name) {
            Err(Error::InvalidLockName { reason, .. }) => {
                assert_eq!(reason, want, "why {name:?} is invalid")
            }
            other => panic!("{name:?} must be Error::InvalidLockName, got {other:?}"),
        }
    }
    close(h, a, "a").await;
}

/// Clause 10 through the driver: `connect` to a server that cannot be
/// reached ([`Harness::unreachable_driver`]) fails with [`Error::Connect`]
/// within [`Harness::settle`], classified (not [`ErrorKind::Other`]), naming
/// the database, with the driver's error as source.
pub async fn clause_10_connect_error_typed<H: Harness>(h: &H) {
    let Some(driver) = h.unreachable_driver() else {
        eprintln!(
            "NOT CHECKED: clause 10: the {} harness offers no unreachable driver, so connect \
             failures are not checked (implement Harness::unreachable_driver)",
            h.driver().name()
        );
        return;
    };
    let db = h.database();
    let settle = h.settle();
    let started = Instant::now();
    let connected = within(
        settle,
        format!("connect to an unreachable server for {db}"),
        driver.connect(&db, &NodeId::new("unreachable")),
    )
    .await;
    let took = started.elapsed();
    let err = match connected {
        Ok(_) => panic!("connect to an unreachable server succeeded"),
        Err(err) => err,
    };
    match &err {
        Error::Connect { database, kind, .. } => {
            assert_eq!(database, &db, "the error carries the database: {err:?}");
            assert_ne!(
                *kind,
                ErrorKind::Other,
                "an unreachable server is classified (session-fatal or config): {err:?}"
            );
        }
        other => panic!("an unreachable server must be Error::Connect, got {other:?}"),
    }
    assert!(
        err.to_string().contains(db.as_str()),
        "the message names the database {db}: {err}"
    );
    assert!(
        std::error::Error::source(&err).is_some(),
        "the driver's error is the source: {err:?}"
    );
    eprintln!(
        "clause 10: unreachable server refused in {took:?}: {}",
        err.report()
    );
}

async fn probe<H: Harness>(h: &H, s: &mut SessionOf<H>, keys: &[LockKey]) -> Vec<bool> {
    let what = format!("probe of {} keys", keys.len());
    match within(h.settle(), &what, s.probe(keys)).await {
        Ok(v) => {
            assert_eq!(v.len(), keys.len(), "one answer per key, got {v:?}");
            v
        }
        Err(e) => panic!("{what} failed: {e:?}"),
    }
}

/// Clause 11: `probe` tells which keys **another** session holds (duplicates
/// answered alike, the prober's own keys `false`, an empty batch an empty
/// answer) and leaves every key as it found it: the prober holds nothing
/// afterwards, a free probed key is still free for a third session, and the
/// holder still holds its key. The probe of keys held elsewhere and free
/// costs at most two round trips (one for a driver that looks without
/// locking, two for the default take-and-give-back); the count is printed.
pub async fn clause_11_probe<H: Harness>(h: &H) {
    let keys = unique_keys("c11", 2);
    let (k1, k2) = (&keys[0], &keys[1]);
    let mut a = open(h, "a").await;
    let mut b = open(h, "b").await;
    assert!(try_one(h, &mut a, k1).await, "a takes a free key");

    assert!(
        probe(h, &mut b, &[]).await.is_empty(),
        "a probe of no keys answers no keys"
    );
    if h.round_trips(&b).is_none() {
        eprintln!(
            "NOT COUNTED: clause 11: the {} harness cannot count round trips, so the cost of a \
             probe is not checked (implement Harness::round_trips)",
            h.driver().name()
        );
    }
    let before = h.round_trips(&b);
    let seen = probe(h, &mut b, &[k1.clone(), k2.clone(), k1.clone()]).await;
    let probe_trips = trips(before, h.round_trips(&b));
    assert_eq!(
        seen,
        vec![true, false, true],
        "b's probe of [k1 (held by a), k2 (free), k1]"
    );
    assert!(
        b.held().is_empty(),
        "a probe leaves the prober holding nothing: {:?}",
        b.held()
    );
    if let Some(n) = probe_trips {
        assert!(
            (1..=2).contains(&n),
            "a probe of keys not held here asks the server in one round trip (two for the \
             default take-and-give-back), cost {n}"
        );
        if h.driver().capabilities().probe == shardlock_core::Support::Native {
            assert_eq!(
                n,
                1,
                "the {} driver states a native probe (it takes nothing), which is one round trip",
                h.driver().name()
            );
        }
    }
    eprintln!("clause 11: probe took {} round trip(s)", shown(probe_trips));

    let own = probe(h, &mut a, &[k1.clone(), k2.clone()]).await;
    assert_eq!(
        own,
        vec![false, false],
        "a's probe of [k1 (its own), k2 (free)]: only another session's hold answers true"
    );
    assert_eq!(
        a.held(),
        vec![k1.clone()],
        "probing its own key keeps it held, and k2 was not kept"
    );

    let mut c = open(h, "c").await;
    assert!(
        try_one(h, &mut c, k2).await,
        "the probes left the free key k2 free"
    );
    assert!(
        !try_one(h, &mut c, k1).await,
        "the probes left k1 held by a"
    );
    close(h, a, "a").await;
    close(h, b, "b").await;
    close(h, c, "c").await;
}

/// How long clause 12 waits to see that something does **not** arrive (an
/// announcement of a release that freed nothing, an echo of a session's own
/// announcement).
const ABSENCE_WAIT: Duration = Duration::from_millis(300);

async fn release_announced<H: Harness>(
    h: &H,
    s: &mut SessionOf<H>,
    keys: &[LockKey],
    clean: &[bool],
) -> Vec<bool> {
    let what = format!("release_announced of {} keys", keys.len());
    match within(h.settle(), &what, s.release_announced(keys, clean)).await {
        Ok(v) => {
            assert_eq!(v.len(), keys.len(), "one answer per key, got {v:?}");
            v
        }
        Err(e) => panic!("{what} failed: {e:?}"),
    }
}

/// Waits until `listener` hears `announcer`'s announcements: a driver may
/// start listening in the background after `connect` returns (Postgres
/// opens a listening connection), so the clause announces a throwaway key
/// until it arrives marked clean, within [`Harness::settle`].
async fn hints_ready<H: Harness>(h: &H, announcer: &mut SessionOf<H>, listener: &ReleaseHints) {
    let probe = unique_keys("c12-ready", 1);
    let deadline = Instant::now() + h.settle();
    loop {
        take_all(announcer, &probe).await;
        release_announced(h, announcer, &probe, &[true]).await;
        let wait = tokio::time::timeout(Duration::from_millis(200), listener.released()).await;
        if wait.is_ok() && listener.take_clean(&probe[0]) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the {} driver's session b never heard session a's announcements within {:?}",
            h.driver().name(),
            h.settle()
        );
    }
}

/// The release hints of `session`, which a driver stating
/// `Capabilities::release_hint` must give every session.
fn hints_of<H: Harness>(h: &H, session: &SessionOf<H>, who: &str) -> ReleaseHints {
    let signals = session.signals();
    match signals.release_hints() {
        Some(hints) => hints.clone(),
        None => panic!(
            "the {} driver states release hints ({:?}) but session {who}'s signals have none: \
             {signals:?}",
            h.driver().name(),
            h.driver().capabilities().release_hint
        ),
    }
}

/// Clause 12: `release_announced` releases like `release_many` (held keys
/// `true`, a key not held `false`, the released keys free for others at
/// once). Where the driver states release hints, another session of the
/// database is woken (`released()` within [`Harness::settle`]) with the
/// cleanly handed-over key marked clean and the other not; the announcing
/// session does not hear its own announcement; and a release that frees
/// nothing announces nothing. A driver without hints is said loudly
/// (`NOT OFFERED`).
///
/// The absence checks look for clean marks of this clause's own keys, not
/// at announcement counts, so other tests announcing releases in the same
/// database meanwhile cannot fail them.
pub async fn clause_12_release_announced<H: Harness>(h: &H) {
    let keys = unique_keys("c12", 4);
    let (k1, k2, k3, k4) = (&keys[0], &keys[1], &keys[2], &keys[3]);
    let driver = h.driver();
    let hinted = driver.capabilities().release_hint.is_supported();
    if !hinted {
        eprintln!(
            "NOT OFFERED: {} has no release hints; clause 12 checked the release only",
            driver.name()
        );
    }
    let mut a = open(h, "a").await;
    let mut b = open(h, "b").await;
    let hints = hinted.then(|| (hints_of(h, &a, "a"), hints_of(h, &b, "b")));
    if let Some((_, hb)) = &hints {
        hints_ready(h, &mut a, hb).await;
    }
    take_all(&mut a, &keys[..2]).await;
    let before = hints
        .as_ref()
        .map(|(ha, hb)| (ha.received(), hb.received()));

    let answers = release_announced(
        h,
        &mut a,
        &[k1.clone(), k2.clone(), k3.clone()],
        &[true, false, true],
    )
    .await;
    assert_eq!(
        answers,
        vec![true, true, false],
        "release_announced of [k1 (held), k2 (held), k3 (not held)]"
    );
    assert!(a.held().is_empty(), "nothing left: {:?}", a.held());

    if let (Some((ha, hb)), Some((a_before, b_before))) = (&hints, before) {
        // Wait for an announcement that marks k1 clean: on a shared
        // database another test's announcement may wake b first.
        let settle = h.settle();
        let deadline = Instant::now() + settle;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, hb.released()).await.is_err() {
                let got = hb.received() - b_before;
                panic!(
                    "no announcement marking k1 clean reached session b within {settle:?} of \
                     a's release_announced (b received {got} announcement(s) meanwhile)"
                );
            }
            if hb.take_clean(k1) {
                break;
            }
            eprintln!(
                "clause 12: b woke without k1 marked clean ({} announcement(s) since the \
                 release; another test's?), waiting on",
                hb.received() - b_before
            );
        }
        assert!(
            hb.received() > b_before,
            "b was woken, so its received() counts the announcement"
        );
        assert!(
            !hb.take_clean(k2),
            "k2 was released with clean = false: it must not be marked clean at b"
        );
        // k3 was not held: whether it is marked is the driver's choice.
        tokio::time::sleep(ABSENCE_WAIT).await;
        assert!(
            !ha.take_clean(k1),
            "the announcing session a must not receive its own announcement (k1 marked clean at a; \
             a received {} announcement(s) since, others' included)",
            ha.received() - a_before
        );
    }

    let granted = batch(h, &mut b, &keys[..2]).await;
    assert_eq!(
        granted,
        vec![true, true],
        "the announced keys are free for another session"
    );

    // A release that frees nothing (k1 is b's now, k3 and k4 were never
    // a's) answers false everywhere and announces nothing.
    let answers = release_announced(
        h,
        &mut a,
        &[k1.clone(), k3.clone(), k4.clone()],
        &[true, true, true],
    )
    .await;
    assert_eq!(
        answers,
        vec![false, false, false],
        "release_announced of keys a does not hold"
    );
    assert!(
        !try_one(h, &mut a, k1).await,
        "a's release_announced did not free b's key"
    );
    if let Some((ha, hb)) = &hints {
        tokio::time::sleep(ABSENCE_WAIT).await;
        assert!(
            !hb.take_clean(k1) && !hb.take_clean(k4),
            "a release_announced that freed nothing must announce nothing (k1 or k4 marked clean at b)"
        );
        assert!(
            !ha.take_clean(k1) && !ha.take_clean(k4),
            "a never receives its own announcements"
        );
        eprintln!(
            "clause 12: the {} driver announced the release to b with k1 clean and k2 not; no \
             echo at a, no announcement of an empty release",
            driver.name()
        );
    }
    close(h, a, "a").await;
    close(h, b, "b").await;
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
    let denied = batch(h, &mut b, &keys).await;
    assert!(
        denied.iter().all(|g| !*g),
        "hostile names exclude like others: {denied:?}"
    );
    within(h.settle(), "verify", a.verify())
        .await
        .expect("verify");
    for key in &keys {
        assert!(release(h, &mut a, key).await, "release {key:?}");
    }
    let granted = batch(h, &mut b, &keys).await;
    assert!(granted.iter().all(|g| *g));
    close(h, a, "a").await;
    close(h, b, "b").await;
}

/// Leader election: the non-blocking form reports `LockNotAcquired`; a
/// standby waiting in the database takes over on graceful release.
pub async fn leadership_handoff<H: Harness>(h: &H) {
    let key = unique_keys("leader", 1).remove(0);
    let db = h.database();
    let settle = h.settle();
    let (da, db_b) = (h.driver(), h.driver());
    let leader = within(
        settle,
        "first leader",
        acquire_leadership(&da, &db, &NodeId::new("a"), key.clone()),
    )
    .await
    .expect("first leader");
    match within(
        settle,
        "second leader",
        acquire_leadership(&db_b, &db, &NodeId::new("b"), key.clone()),
    )
    .await
    {
        Err(Error::LockNotAcquired { name }) => assert_eq!(name, key.name()),
        other => panic!("second leader must get LockNotAcquired, got {other:?}"),
    }
    let cancel = CancellationToken::new();
    let mut standby = {
        let (driver, db, key, cancel) = (db_b.clone(), db.clone(), key.clone(), cancel.clone());
        tokio::spawn(async move {
            let guard = wait_for_leadership(&driver, &db, &NodeId::new("b"), key, &cancel).await;
            (guard, Instant::now())
        })
    };
    let seen = within(
        settle + h.slack(),
        "leadership: seeing the standby wait",
        async {
            tokio::select! {
                seen = h.wait_until_waiting(&key) => seen,
                done = &mut standby => panic!(
                    "the standby returned instead of waiting: {:?}",
                    done.map(|(guard, _)| guard.map(|g| g.is_some()))
                ),
            }
        },
    )
    .await;
    report_unseen(h, seen, "leadership");
    assert!(
        !standby.is_finished(),
        "the standby waits while a leader holds the key"
    );
    let released = Instant::now();
    within(settle, "leader release", leader.release())
        .await
        .expect("release leadership");
    let (guard, took_over) = within(settle, "the standby's takeover", standby)
        .await
        .expect("task");
    let guard = guard.expect("wait ok").expect("granted");
    eprintln!(
        "leadership: graceful handoff took {:?}",
        took_over.saturating_duration_since(released)
    );
    // A cancelled standby leaves nothing held.
    let cancel2 = CancellationToken::new();
    cancel2.cancel();
    let none = within(
        settle,
        "cancelled standby",
        wait_for_leadership(&da, &db, &NodeId::new("c"), key.clone(), &cancel2),
    )
    .await
    .expect("cancelled wait");
    assert!(none.is_none(), "a cancelled standby gets no guard");
    within(settle, "release", guard.release())
        .await
        .expect("release");
    cancel.cancel();
}
