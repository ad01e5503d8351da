//! `CoordinatorHandle::health()`: degraded while the node cannot reach its
//! database or its agents keep failing, healthy again once they recover,
//! stopped after `stop()`.

use std::time::Duration;

use shardlock_contract_tests::{shards, Recorder, RecordingAgent};
use shardlock_core::{
    Agent, AgentContext, AgentError, Coordinator, CoordinatorHandle, DatabaseId, Health, ShardId,
};
use shardlock_distributors::SingleTenant;
use shardlock_memory::{MemoryDriver, MemoryServer};

const POLL: Duration = Duration::from_millis(200);
/// Bound on every wait (generous: the check is the state reached, not when).
const PATIENCE: Duration = Duration::from_secs(20);

fn coordinator<A: Agent>(driver: MemoryDriver, agent: A) -> CoordinatorHandle {
    Coordinator::builder(
        driver,
        SingleTenant::new(DatabaseId::new("main"), "app", shards(4)),
        agent,
    )
    .node_id("n1")
    .poll_interval(POLL)
    .pause_interval(Duration::from_millis(100))
    .lock_loss_timeout(Duration::from_millis(300))
    .stop_timeout(Duration::from_secs(2))
    .restart_backoff(Duration::from_millis(50), Duration::from_millis(200))
    .build()
    .expect("coordinator")
    .start()
    .expect("start")
}

/// Waits until the health satisfies `want`; panics with the last value
/// after [`PATIENCE`].
async fn health_until(handle: &CoordinatorHandle, what: &str, want: impl Fn(&Health) -> bool) {
    let mut rx = handle.health_changes();
    let reached = tokio::time::timeout(PATIENCE, rx.wait_for(|h| want(h))).await;
    assert!(
        matches!(reached, Ok(Ok(_))),
        "health never became {what}; last: {}",
        handle.health()
    );
}

#[tokio::test]
async fn degraded_while_the_database_is_unreachable_then_healthy() {
    let server = MemoryServer::new();
    let driver = server.driver();
    let recorder = Recorder::new();
    let handle = coordinator(driver.clone(), RecordingAgent::new(recorder.clone()));
    assert!(
        !handle.health().is_ready(),
        "not ready before the first cycle: {}",
        handle.health()
    );
    health_until(&handle, "healthy", Health::is_ready).await;
    assert!(handle.health().is_alive());

    // Connection reset and connects refused: the loss is seen at once.
    driver.sever();
    health_until(&handle, "degraded (unreachable)", |h| {
        matches!(h, Health::Degraded { reasons } if reasons.iter().any(|r| r.contains("database main unreachable")))
    })
    .await;
    let health = handle.health();
    assert!(health.is_alive() && !health.is_ready(), "{health}");

    driver.heal();
    health_until(&handle, "healthy again", Health::is_ready).await;

    handle.stop().await.expect("stop");
}

#[tokio::test]
async fn stopped_after_stop() {
    let server = MemoryServer::new();
    let recorder = Recorder::new();
    let handle = coordinator(server.driver(), RecordingAgent::new(recorder.clone()));
    health_until(&handle, "healthy", Health::is_ready).await;
    let mut changes = handle.health_changes();
    handle.stop().await.expect("stop");
    let last = changes.borrow_and_update().clone();
    assert_eq!(
        last,
        Health::Stopped {
            reason: "stopped".into()
        }
    );
    assert!(!last.is_alive());
}

/// An agent that fails at once, every time.
struct Failing;

impl Agent for Failing {
    async fn run(&self, _shard: &ShardId, _ctx: AgentContext) -> Result<(), AgentError> {
        Err("projection store down".into())
    }
}

#[tokio::test]
async fn failing_agents_degrade_health() {
    let server = MemoryServer::new();
    let handle = coordinator(server.driver(), Failing);
    health_until(&handle, "degraded (agents failing)", |h| {
        matches!(h, Health::Degraded { reasons } if reasons.iter().any(|r| r.contains("agents failing")))
    })
    .await;
    assert!(handle.health().is_alive());
    handle.stop().await.expect("stop");
}
