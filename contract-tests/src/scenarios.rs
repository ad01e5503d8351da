//! Coordinator scenarios every driver must pass: several coordinators over
//! one database, graceful stop, failing agents.

use std::collections::HashSet;
use std::time::Duration;

use shardlock_core::{Coordinator, CoordinatorHandle, Distributor, Driver, Error, NodeId, ShardId};
use shardlock_distributors::SingleTenant;

use crate::balancing::measured_round_trip;
use crate::harness::{unique_name, within, Harness};
use crate::recorder::{Recorder, RecordingAgent};

/// Poll interval of the scenario coordinators.
pub const SCENARIO_POLL: Duration = Duration::from_millis(250);

/// Lock-loss timeout of the scenario coordinators.
pub const SCENARIO_LOCK_LOSS_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the scenario coordinators wait after taking a set before its
/// agents start: the driver's loss detection bound, or, without a loss
/// signal, the next verify (as the coordinator's builder computes it).
pub fn scenario_takeover_delay<H: Harness>(h: &H) -> Duration {
    h.driver()
        .capabilities()
        .loss_detection_bound
        .unwrap_or(SCENARIO_POLL + SCENARIO_LOCK_LOSS_TIMEOUT)
}

/// "Every shard owned" must hold within two poll intervals, plus the
/// takeover delay, plus the harness's [`slack`](Harness::slack), plus 400
/// round trips to the server measured when the scenario starts (see
/// [`measured_round_trip`]): a slower server, or one shared by several test
/// processes, gets proportionally more time.
pub async fn scenario_within<H: Harness>(h: &H) -> Duration {
    SCENARIO_POLL * 2 + scenario_takeover_delay(h) + h.slack() + measured_round_trip(h).await * 400
}

/// Starts one coordinator for `shards` of `schema` with test-friendly timings.
pub fn start_node<H: Harness>(
    h: &H,
    node: &str,
    schema: &str,
    shards: &[ShardId],
    recorder: &Recorder,
) -> CoordinatorHandle {
    let distributor = SingleTenant::new(h.database(), schema, shards.iter().cloned());
    start_node_with(h, node, distributor, recorder)
}

/// Starts one coordinator over `distributor` with the scenario timings.
pub fn start_node_with<H: Harness, S: Distributor>(
    h: &H,
    node: &str,
    distributor: S,
    recorder: &Recorder,
) -> CoordinatorHandle {
    let coordinator = Coordinator::builder(
        h.driver(),
        distributor,
        RecordingAgent::new(recorder.clone()),
    )
    .node_id(NodeId::new(node))
    .poll_interval(SCENARIO_POLL)
    .pause_interval(Duration::from_millis(100))
    .start_jitter(Duration::from_millis(50))
    .lock_loss_timeout(SCENARIO_LOCK_LOSS_TIMEOUT)
    .stop_timeout(Duration::from_secs(2))
    .restart_backoff(Duration::from_millis(50), Duration::from_secs(1))
    .build()
    .expect("scenario coordinator config is valid");
    coordinator.start().expect("first start")
}

/// `n` shard ids.
pub fn shards(n: usize) -> Vec<ShardId> {
    (0..n)
        .map(|i| ShardId::new(format!("shard-{i:02}")))
        .collect()
}

/// Whether every shard runs on exactly one node.
pub fn all_owned_once(recorder: &Recorder, shards: &[ShardId]) -> bool {
    let running = recorder.running();
    shards.iter().all(|s| {
        running
            .iter()
            .filter(|((_, shard), _)| shard == s)
            .map(|(_, nodes)| nodes.len())
            .sum::<usize>()
            == 1
    })
}

/// 3 coordinators × 12 shards: every shard owned within two poll intervals
/// (plus slack), never by two nodes at once; a gracefully stopped node's
/// shards move to the others, its agents stopped before anyone else starts
/// them.
pub async fn scenario_spread_and_graceful_stop<H: Harness>(h: &H) {
    let schema = unique_name("spread");
    let shards = shards(12);
    let recorder = Recorder::new();
    let nodes: Vec<CoordinatorHandle> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| start_node(h, n, &schema, &shards, &recorder))
        .collect();
    let limit = scenario_within(h).await;
    let settle = h.settle();
    assert!(
        recorder
            .wait_for(limit, |r| all_owned_once(r, &shards))
            .await,
        "not every shard owned within {limit:?}: {:?}",
        recorder.running()
    );
    let owners: HashSet<NodeId> = recorder.running().into_values().flatten().collect();
    eprintln!("scenario: 12 shards spread over {} nodes", owners.len());

    // Stop the busiest node, so there is something to hand over.
    let busiest = nodes
        .iter()
        .enumerate()
        .max_by_key(|(_, n)| recorder.running_on(n.node_id()))
        .map(|(i, _)| i)
        .expect("three nodes");
    let mut nodes = nodes;
    let stopped = nodes.remove(busiest);
    let stopped_id = stopped.node_id().clone();
    let handed_over = recorder.running_on(&stopped_id);
    assert!(handed_over > 0, "the busiest node runs something");
    within(
        settle,
        format!("graceful stop of {stopped_id}"),
        stopped.stop(),
    )
    .await
    .expect("graceful stop");
    assert_eq!(
        recorder.running_on(&stopped_id),
        0,
        "stop() returns only after its agents stopped"
    );
    assert!(
        recorder
            .wait_for(limit, |r| all_owned_once(r, &shards))
            .await,
        "the stopped node's shards were not taken over within {limit:?}: {:?}",
        recorder.running()
    );
    assert_eq!(recorder.overlaps(), 0, "two nodes ran one shard at once");
    eprintln!("scenario: {handed_over} shards handed over from {stopped_id}");
    for node in nodes {
        let id = node.node_id().clone();
        within(settle, format!("stop of {id}"), node.stop())
            .await
            .expect("stop");
    }
    assert!(
        recorder.running().is_empty(),
        "nothing runs after every node stopped"
    );
    assert_eq!(recorder.overlaps(), 0);
}

/// An agent that fails (error, then panic) is restarted with backoff while
/// the lock stays held, and the coordinator survives.
pub async fn scenario_failing_agent_restarted<H: Harness>(h: &H) {
    let schema = unique_name("failing");
    let shards = shards(2);
    let recorder = Recorder::new();
    recorder.fail_next(&shards[0], 2);
    let node = start_node(h, "node-f", &schema, &shards, &recorder);
    let mut assignment = node.assignment();
    let settle = h.settle() + measured_round_trip(h).await * 400;
    let restarted = recorder
        .wait_for(settle + scenario_takeover_delay(h), |r| {
            let runs = r.runs();
            let of_failing: Vec<_> = runs.iter().filter(|run| run.shard == shards[0]).collect();
            of_failing.len() >= 3 && of_failing.last().is_some_and(|run| run.stopped.is_none())
        })
        .await;
    assert!(
        restarted,
        "failing agent not restarted to a healthy run: {:?}",
        recorder.runs()
    );
    let mut current = assignment.borrow_and_update().clone();
    let deadline = tokio::time::Instant::now() + settle;
    while current.owned.len() < 2 {
        let changed = tokio::time::timeout_at(deadline, assignment.changed()).await;
        assert!(
            matches!(changed, Ok(Ok(()))),
            "the assignment did not show both sets within {settle:?} ({changed:?}): {current:?}"
        );
        current = assignment.borrow_and_update().clone();
    }
    assert_eq!(current.owned.len(), 2, "both sets still owned: {current:?}");
    assert!(
        current.owned.iter().all(|s| s.epoch == 1),
        "the lock was kept (never re-acquired) through the failures: {current:?}"
    );
    let healthy_runs = recorder
        .runs()
        .iter()
        .filter(|r| r.shard == shards[1])
        .count();
    assert_eq!(healthy_runs, 1, "the healthy shard was never restarted");
    assert!(
        !node.is_finished(),
        "a panicking agent never takes the coordinator down"
    );
    within(settle, "stop", node.stop()).await.expect("stop");
    assert!(recorder.running().is_empty());
}

/// A second `start` of one coordinator is an error.
pub async fn scenario_double_start_is_error<H: Harness>(h: &H) {
    let schema = unique_name("double");
    let recorder = Recorder::new();
    let distributor = SingleTenant::new(h.database(), &schema, shards(1));
    let coordinator = Coordinator::builder(h.driver(), distributor, RecordingAgent::new(recorder))
        .poll_interval(SCENARIO_POLL)
        .build()
        .expect("config");
    let handle = coordinator.start().expect("first start");
    assert!(matches!(coordinator.start(), Err(Error::AlreadyStarted)));
    within(h.settle(), "stop", handle.stop())
        .await
        .expect("stop");
    assert!(
        matches!(coordinator.start(), Err(Error::AlreadyStarted)),
        "not even after stop"
    );
}
