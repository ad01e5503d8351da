//! `probe` and announced releases (contract clauses 11 and 12) on the memory
//! driver: the server's own view, one round trip each, and hints delivered
//! to the other reachable sessions of the database only.

use std::time::Duration;

use shardlock_core::{DatabaseId, Driver, LockKey, NodeId, ReleaseHints, Session, Support};
use shardlock_memory::{MemoryServer, MemorySession};

/// How long a test waits for a hint that must come (it comes at once).
const ARRIVES: Duration = Duration::from_secs(2);
/// How long a test waits to see a hint that must not come.
const ABSENT: Duration = Duration::from_millis(50);

fn keys(what: &str, n: usize) -> Vec<LockKey> {
    (0..n)
        .map(|i| LockKey::new(format!("hints-{what}-{i}")).unwrap())
        .collect()
}

async fn connect(server: &MemoryServer, db: &str, node: &str) -> MemorySession {
    server
        .driver()
        .connect(&DatabaseId::new(db), &NodeId::new(node))
        .await
        .unwrap()
}

fn hints(session: &MemorySession) -> ReleaseHints {
    session
        .signals()
        .release_hints()
        .cloned()
        .expect("every memory session has release hints")
}

/// Whether a hint arrives within `wait`.
async fn woken(hints: &ReleaseHints, wait: Duration) -> bool {
    tokio::time::timeout(wait, hints.released()).await.is_ok()
}

#[tokio::test(flavor = "current_thread")]
async fn the_driver_states_native_release_hints_and_probe() {
    let server = MemoryServer::new();
    let caps = server.driver().capabilities();
    assert_eq!(caps.release_hint, Support::Native);
    assert_eq!(caps.loss_signal, Support::Native);
    assert_eq!(caps.probe, Support::Native, "the probe takes nothing");
}

#[tokio::test(flavor = "current_thread")]
async fn probe_sees_other_sessions_holds_in_one_round_trip_and_takes_nothing() {
    let server = MemoryServer::new();
    let mut a = connect(&server, "db", "a").await;
    let mut b = connect(&server, "db", "b").await;
    let k = keys("probe", 3);
    assert_eq!(
        a.try_acquire(&[k[0].clone(), k[2].clone()]).await.unwrap(),
        vec![true, true]
    );

    let before = server.round_trips();
    assert_eq!(b.probe(&k).await.unwrap(), vec![true, false, true]);
    assert_eq!(
        server.round_trips() - before,
        1,
        "a probe is one round trip"
    );
    assert!(b.held().is_empty(), "the prober holds nothing");
    assert!(
        server.holder(b.database(), &k[1]).is_none(),
        "the free key was not taken, not even for a moment the table keeps"
    );

    // The holder's own keys answer false, and asking only about them sends
    // nothing.
    let before = server.round_trips();
    assert_eq!(
        a.probe(&[k[0].clone(), k[2].clone(), k[0].clone()])
            .await
            .unwrap(),
        vec![false, false, false]
    );
    assert_eq!(server.round_trips(), before, "own keys cost no round trip");
    assert_eq!(a.probe(&k).await.unwrap(), vec![false, false, false]);
    assert_eq!(a.held().len(), 2, "probing keeps a's keys held");

    // Duplicates answer alike; an empty probe answers nothing.
    assert_eq!(
        b.probe(&[k[0].clone(), k[0].clone()]).await.unwrap(),
        vec![true, true]
    );
    assert!(b.probe(&[]).await.unwrap().is_empty());

    // A third session takes the free key: the probes left it free.
    let mut c = connect(&server, "db", "c").await;
    assert_eq!(
        c.try_acquire(&k).await.unwrap(),
        vec![false, true, false],
        "k1 free, k0 and k2 still a's"
    );
    assert_eq!(b.probe(&k).await.unwrap(), vec![true, true, true]);

    // Another database's locks are not seen.
    let mut other = connect(&server, "other", "o").await;
    assert_eq!(other.probe(&k).await.unwrap(), vec![false, false, false]);
}

#[tokio::test(flavor = "current_thread")]
async fn probe_follows_the_server_view_of_a_cut_off_holder() {
    let server = MemoryServer::with_release_window(Duration::from_millis(100));
    let cut = server.driver();
    let mut a = cut
        .connect(&DatabaseId::new("db"), &NodeId::new("a"))
        .await
        .unwrap();
    let mut b = connect(&server, "db", "b").await;
    let k = keys("cut", 1);
    assert_eq!(a.try_acquire(&k).await.unwrap(), vec![true]);
    cut.sever();
    assert_eq!(
        b.probe(&k).await.unwrap(),
        vec![true],
        "the server keeps a severed session's lock for its window"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        b.probe(&k).await.unwrap(),
        vec![false],
        "freed after the window"
    );
    let err = a.probe(&k).await.unwrap_err();
    assert!(
        err.is_session_fatal(),
        "a severed session's probe fails: {err}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn an_announced_release_wakes_the_other_sessions_with_clean_marks() {
    let server = MemoryServer::new();
    let mut a = connect(&server, "db", "a").await;
    let mut b = connect(&server, "db", "b").await;
    let mut c = connect(&server, "db", "c").await;
    let (ha, hb, hc) = (hints(&a), hints(&b), hints(&c));
    let k = keys("announce", 4);
    assert_eq!(a.try_acquire(&k[..3]).await.unwrap(), vec![true; 3]);
    assert_eq!(c.try_acquire(&k[3..]).await.unwrap(), vec![true]);

    let before = server.round_trips();
    let answers = a
        .release_announced(
            &[k[0].clone(), k[1].clone(), k[3].clone(), k[2].clone()],
            // k2's mark is missing: not clean; k3 is not a's to release.
            &[true, false, true],
        )
        .await
        .unwrap();
    assert_eq!(answers, vec![true, true, false, true]);
    assert_eq!(
        server.round_trips() - before,
        1,
        "release and announcement are one round trip"
    );
    assert_eq!(server.announcements(), 1);
    assert!(a.held().is_empty());

    for (who, h) in [("b", &hb), ("c", &hc)] {
        assert!(woken(h, ARRIVES).await, "{who} is woken");
        assert_eq!(h.received(), 1, "{who} heard one announcement");
        assert!(h.take_clean(&k[0]), "{who}: k0 was handed over cleanly");
        assert!(!h.take_clean(&k[1]), "{who}: k1 was released not clean");
        assert!(!h.take_clean(&k[2]), "{who}: k2 had no clean entry");
        assert!(!h.take_clean(&k[3]), "{who}: k3 was not released by a");
    }
    assert_eq!(ha.received(), 0, "a does not hear its own announcement");
    assert!(!woken(&ha, ABSENT).await);
    assert_eq!(
        b.try_acquire(&k[..3]).await.unwrap(),
        vec![true; 3],
        "the announced keys are free"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_key_listed_twice_is_clean_only_if_every_entry_says_so() {
    let server = MemoryServer::new();
    let mut a = connect(&server, "db", "a").await;
    let b = connect(&server, "db", "b").await;
    let hb = hints(&b);
    let k = keys("twice", 2);
    assert_eq!(a.try_acquire(&k).await.unwrap(), vec![true; 2]);
    let answers = a
        .release_announced(
            &[k[0].clone(), k[0].clone(), k[1].clone(), k[1].clone()],
            &[true, false, true, true],
        )
        .await
        .unwrap();
    assert_eq!(answers, vec![true, false, true, false]);
    assert!(woken(&hb, ARRIVES).await);
    assert!(!hb.take_clean(&k[0]), "one entry said not clean");
    assert!(hb.take_clean(&k[1]));
}

#[tokio::test(flavor = "current_thread")]
async fn a_release_that_frees_nothing_announces_nothing() {
    let server = MemoryServer::new();
    let mut a = connect(&server, "db", "a").await;
    let mut b = connect(&server, "db", "b").await;
    let hb = hints(&b);
    let k = keys("nothing", 2);
    assert_eq!(b.try_acquire(&k[..1]).await.unwrap(), vec![true]);
    let before = server.round_trips();
    assert_eq!(
        a.release_announced(&k, &[true, true]).await.unwrap(),
        vec![false, false]
    );
    assert_eq!(server.round_trips(), before, "nothing held, nothing sent");
    assert_eq!(server.announcements(), 0);
    assert!(!woken(&hb, ABSENT).await, "b hears nothing");
    assert_eq!(hb.received(), 0);
    assert!(!hb.take_clean(&k[1]));
    assert_eq!(b.held(), k[..1].to_vec(), "b's key is untouched");
}

#[tokio::test(flavor = "current_thread")]
async fn cut_off_ended_and_other_database_sessions_hear_nothing() {
    let server = MemoryServer::new();
    let mut a = connect(&server, "db", "a").await;
    let listener = connect(&server, "db", "listener").await;
    let other_db = connect(&server, "other", "o").await;
    let partitioned_driver = server.driver();
    let partitioned = partitioned_driver
        .connect(&DatabaseId::new("db"), &NodeId::new("p"))
        .await
        .unwrap();
    let severed_driver = server.driver();
    let severed = severed_driver
        .connect(&DatabaseId::new("db"), &NodeId::new("s"))
        .await
        .unwrap();
    let terminated = connect(&server, "db", "t").await;
    let hears = [
        ("listener", hints(&listener)),
        ("other database", hints(&other_db)),
        ("partitioned", hints(&partitioned)),
        ("severed", hints(&severed)),
        ("terminated", hints(&terminated)),
    ];
    partitioned_driver.partition();
    severed_driver.sever();
    server.terminate(terminated.id());

    let k = keys("cut", 1);
    assert_eq!(a.try_acquire(&k).await.unwrap(), vec![true]);
    assert_eq!(a.release_announced(&k, &[true]).await.unwrap(), vec![true]);
    for (who, h) in &hears {
        let expected = u64::from(*who == "listener");
        assert_eq!(h.received(), expected, "{who}");
        assert_eq!(h.take_clean(&k[0]), *who == "listener", "{who}");
    }
    partitioned_driver.heal();
    drop((partitioned, severed, terminated));
}

#[tokio::test(flavor = "current_thread")]
async fn a_closed_session_is_forgotten_and_hears_nothing_more() {
    let server = MemoryServer::new();
    let mut a = connect(&server, "db", "a").await;
    let b = connect(&server, "db", "b").await;
    let hb = hints(&b);
    b.close().await.unwrap();
    let k = keys("closed", 1);
    assert_eq!(a.try_acquire(&k).await.unwrap(), vec![true]);
    assert_eq!(a.release_announced(&k, &[true]).await.unwrap(), vec![true]);
    assert_eq!(server.announcements(), 1);
    assert_eq!(hb.received(), 0, "a closed session is no longer told");
}
