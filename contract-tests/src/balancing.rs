//! Balancing scenarios every driver must pass: fair share over the live
//! nodes through the driver contract alone (member slots, probe, announced
//! releases), never an overlap while sets move, no moves when stable.

use std::time::{Duration, Instant};

use shardlock_core::{CoordinatorHandle, Driver, NodeId, Session, ShardId};
use shardlock_distributors::{Balanced, SingleTenant};

use crate::harness::{unique_keys, unique_name, within, Harness};
use crate::recorder::Recorder;
use crate::scenarios::{
    all_owned_once, scenario_takeover_delay, shards, start_node_with, SCENARIO_POLL,
};

/// How long the stable-cluster scenario watches for moves.
pub const STABLE_WINDOW: Duration = Duration::from_secs(60);

/// The median of a few try-acquire + release round trips to the harness's
/// server, measured now: scenario bounds scale with it, so a slower server
/// (or one shared by several test processes) gets proportionally more time.
pub async fn measured_round_trip<H: Harness>(h: &H) -> Duration {
    let keys = unique_keys("rtt", 1);
    let Ok(Ok(mut session)) = tokio::time::timeout(
        h.settle(),
        h.driver().connect(&h.database(), &NodeId::new("rtt")),
    )
    .await
    else {
        return Duration::ZERO;
    };
    let mut samples = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        if session.try_acquire(&keys).await.is_err() || session.release_many(&keys).await.is_err() {
            break;
        }
        samples.push(started.elapsed() / 2);
    }
    let _ = session.close().await;
    samples.sort();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

/// The bound for "settled": the surplus is released after two cycles in a
/// row above the share, then taken within one more poll; plus the takeover
/// delay, the harness's slack, and 400 measured round trips (a balancing
/// cycle makes three or four, over several nodes, on a loaded machine; a
/// probe that takes and gives back needs one more cycle to count a member).
pub async fn balance_within<H: Harness>(h: &H) -> Duration {
    SCENARIO_POLL * 5 + scenario_takeover_delay(h) + h.slack() + measured_round_trip(h).await * 400
}

/// Starts a balanced node (single tenant inside) with weight `weight`.
pub fn start_balanced<H: Harness>(
    h: &H,
    node: &str,
    schema: &str,
    shards: &[ShardId],
    recorder: &Recorder,
    weight: u32,
) -> CoordinatorHandle {
    let inner = SingleTenant::new(h.database(), schema, shards.iter().cloned());
    let group = format!("{schema}-group");
    let distributor = Balanced::new(inner).group(group).weight(weight);
    start_node_with(h, node, distributor, recorder)
}

/// How many shards each node runs now.
pub fn counts(recorder: &Recorder, nodes: &[&CoordinatorHandle]) -> Vec<usize> {
    nodes
        .iter()
        .map(|n| recorder.running_on(n.node_id()))
        .collect()
}

/// Waits until the nodes run exactly `expected` shards each and every shard
/// runs once; panics with the counts otherwise. Answers how long it took.
pub async fn settle_at(
    recorder: &Recorder,
    nodes: &[&CoordinatorHandle],
    expected: &[usize],
    all: &[ShardId],
    limit: Duration,
    what: &str,
) -> Duration {
    let started = Instant::now();
    let settled = recorder
        .wait_for(limit, |r| {
            counts(r, nodes) == expected && all_owned_once(r, all)
        })
        .await;
    assert!(
        settled,
        "{what}: not settled at {expected:?} within {limit:?}: counts {:?}, running {:?}",
        counts(recorder, nodes),
        recorder.running()
    );
    let took = started.elapsed();
    eprintln!("scenario: {what}: settled at {expected:?} in {took:?}");
    took
}

/// 3 balanced nodes × 12 shards settle at 4/4/4; a fourth node joins →
/// 3/3/3/3; one stops gracefully → 4/4/4; one crashes → 6/6; a node
/// (re)starts → 4/4/4. Never an overlap while sets move.
pub async fn scenario_balance_join_leave_crash<H: Harness>(h: &H) {
    let schema = unique_name("balance");
    let shards = shards(12);
    let recorder = Recorder::new();
    let limit = balance_within(h).await;
    let settle = h.settle();
    let start = |n: &str| start_balanced(h, n, &schema, &shards, &recorder, 1);
    let a = start("node-a");
    let b = start("node-b");
    let c = start("node-c");
    settle_at(
        &recorder,
        &[&a, &b, &c],
        &[4, 4, 4],
        &shards,
        limit,
        "start",
    )
    .await;

    let d = start("node-d");
    settle_at(
        &recorder,
        &[&a, &b, &c, &d],
        &[3, 3, 3, 3],
        &shards,
        limit,
        "join",
    )
    .await;

    within(settle, "graceful stop of node-a", a.stop())
        .await
        .expect("graceful stop");
    settle_at(
        &recorder,
        &[&b, &c, &d],
        &[4, 4, 4],
        &shards,
        limit,
        "graceful leave",
    )
    .await;

    within(settle, "crash of node-b", b.abort()).await;
    settle_at(&recorder, &[&c, &d], &[6, 6], &shards, limit, "crash").await;

    let e = start("node-e");
    settle_at(
        &recorder,
        &[&c, &d, &e],
        &[4, 4, 4],
        &shards,
        limit,
        "restart",
    )
    .await;
    assert_eq!(recorder.overlaps(), 0, "two nodes ran one shard at once");

    for node in [c, d, e] {
        let id = node.node_id().clone();
        within(settle, format!("stop of {id}"), node.stop())
            .await
            .expect("stop");
    }
    assert!(recorder.running().is_empty(), "nothing runs after stop");
    assert_eq!(recorder.overlaps(), 0);
}

/// A settled cluster moves nothing: for [`STABLE_WINDOW`] no node releases
/// a set (its `moves` stay put) and no agent restarts.
pub async fn scenario_balance_stable<H: Harness>(h: &H) {
    let schema = unique_name("stable");
    let shards = shards(12);
    let recorder = Recorder::new();
    let limit = balance_within(h).await;
    let nodes: Vec<CoordinatorHandle> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| start_balanced(h, n, &schema, &shards, &recorder, 1))
        .collect();
    let refs: Vec<&CoordinatorHandle> = nodes.iter().collect();
    settle_at(&recorder, &refs, &[4, 4, 4], &shards, limit, "start").await;
    // Let a move decided in the settling cycle finish.
    tokio::time::sleep(SCENARIO_POLL * 2).await;
    let moves_before: Vec<u64> = nodes
        .iter()
        .map(|n| n.assignment().borrow().moves)
        .collect();
    let runs_before = recorder.runs().len();
    tokio::time::sleep(STABLE_WINDOW).await;
    let after: Vec<_> = nodes
        .iter()
        .map(|n| n.assignment().borrow().clone())
        .collect();
    let moves_after: Vec<u64> = after.iter().map(|a| a.moves).collect();
    assert_eq!(
        moves_before, moves_after,
        "a stable cluster moved sets within {STABLE_WINDOW:?}"
    );
    assert_eq!(
        recorder.runs().len(),
        runs_before,
        "agents (re)started in a stable cluster: {:?}",
        recorder.runs()
    );
    assert_eq!(counts(&recorder, &refs), [4, 4, 4]);
    assert!(
        after.iter().all(|a| a.members == 3 && a.share == Some(4)),
        "every node sees 3 members and a share of 4: {after:?}"
    );
    let cycles: Vec<u64> = after.iter().map(|a| a.cycles).collect();
    eprintln!("scenario: stable for {STABLE_WINDOW:?}: 0 moves over {cycles:?} cycles");
    for node in nodes {
        within(h.settle(), "stop", node.stop()).await.expect("stop");
    }
    assert_eq!(recorder.overlaps(), 0);
}

/// A node alone takes everything, whatever its weight; a node of weight 2
/// and one of weight 1 share 12 sets 8/4; 120 sets over 4 nodes settle at
/// 30 each.
pub async fn scenario_balance_alone_weights_and_scale<H: Harness>(h: &H) {
    let settle = h.settle();
    let limit = balance_within(h).await;

    let schema = unique_name("weights");
    let twelve = shards(12);
    let recorder = Recorder::new();
    let heavy = start_balanced(h, "node-heavy", &schema, &twelve, &recorder, 2);
    settle_at(&recorder, &[&heavy], &[12], &twelve, limit, "alone").await;
    let light = start_balanced(h, "node-light", &schema, &twelve, &recorder, 1);
    settle_at(
        &recorder,
        &[&heavy, &light],
        &[8, 4],
        &twelve,
        limit,
        "weights 2:1",
    )
    .await;
    for node in [heavy, light] {
        within(settle, "stop", node.stop()).await.expect("stop");
    }
    assert_eq!(recorder.overlaps(), 0);

    let schema = unique_name("scale");
    let many: Vec<ShardId> = (0..120)
        .map(|i| ShardId::new(format!("shard-{i:03}")))
        .collect();
    let recorder = Recorder::new();
    let nodes: Vec<CoordinatorHandle> = ["node-a", "node-b", "node-c", "node-d"]
        .iter()
        .map(|n| start_balanced(h, n, &schema, &many, &recorder, 1))
        .collect();
    let refs: Vec<&CoordinatorHandle> = nodes.iter().collect();
    // 120 sets move at most 8 per cycle per node: allow the extra cycles.
    let limit = limit + SCENARIO_POLL * 12;
    settle_at(
        &recorder,
        &refs,
        &[30, 30, 30, 30],
        &many,
        limit,
        "120 over 4",
    )
    .await;
    for node in nodes {
        within(settle, "stop", node.stop()).await.expect("stop");
    }
    assert_eq!(recorder.overlaps(), 0);
}

/// A graceful stop hands every set over at once: the survivors are woken
/// by the announcement (where the driver offers release hints) and start
/// the sets without the takeover delay; without hints they find them at
/// their next poll. Prints how long the sets went without an owner.
pub async fn scenario_balance_graceful_handoff<H: Harness>(h: &H) {
    let schema = unique_name("handoff");
    let shards = shards(12);
    let recorder = Recorder::new();
    let limit = balance_within(h).await;
    let a = start_balanced(h, "node-a", &schema, &shards, &recorder, 1);
    let b = start_balanced(h, "node-b", &schema, &shards, &recorder, 1);
    settle_at(&recorder, &[&a, &b], &[6, 6], &shards, limit, "start").await;
    let stopped = Instant::now();
    within(h.settle(), "graceful stop", a.stop())
        .await
        .expect("graceful stop");
    let stop_took = stopped.elapsed();
    settle_at(&recorder, &[&b], &[12], &shards, limit, "handoff").await;
    let hints = h.driver().capabilities().release_hint.is_supported();
    let woken = b.assignment().borrow().wakeups;
    eprintln!(
        "scenario: graceful handoff of 6 sets: stop took {stop_took:?}, all owned {:?} after the stop began \
         (release hints: {hints}, wake-ups: {woken}; the record is sampled every 20 ms)",
        stopped.elapsed()
    );
    if hints {
        assert!(woken > 0, "the survivor was never woken by an announcement");
    }
    within(h.settle(), "stop", b.stop()).await.expect("stop");
    assert_eq!(recorder.overlaps(), 0);
}
