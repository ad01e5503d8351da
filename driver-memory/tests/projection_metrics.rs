//! The projection runner's metrics, read back from a real Prometheus
//! recorder: events applied, events dead-lettered, and a checkpoint write
//! refused by fencing (`shardlock_core::metrics`).

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use shardlock_contract_tests::{unique_name, Applied, RecordingDeadLetter, TestProjector};
use shardlock_core::{
    CancellationToken, CheckpointStore, DatabaseId, DriverLeadership, NodeId, ProjectionBackend,
    ProjectionError, ProjectionOptions, ProjectionRunner,
};
use shardlock_memory::{MemoryCheckpoints, MemoryEventLog, MemoryServer};

/// The value of `name{projector="<projector>"}` in a Prometheus page.
fn counter(page: &str, name: &str, projector: &str) -> Option<f64> {
    let prefix = format!("{name}{{projector=\"{projector}\"}} ");
    page.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
}

fn options() -> ProjectionOptions {
    ProjectionOptions::default()
        .batch_size(25)
        .retries(3, Duration::from_millis(5))
        .idle(Duration::from_millis(10), Duration::from_millis(50))
}

/// Polls `check` until it holds (hang guard only).
async fn until(what: &str, check: impl Fn() -> bool) {
    for _ in 0..2_000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never saw {what}");
}

#[tokio::test]
async fn projection_metrics_follow_the_run() {
    // One recorder per process: both runs share it, told apart by name.
    let prometheus = PrometheusBuilder::new()
        .install_recorder()
        .expect("the only recorder of this test process");
    let server = MemoryServer::new();
    let events = MemoryEventLog::new();
    for i in 1..=20 {
        assert_eq!(events.append(i), i);
    }
    let checkpoints = MemoryCheckpoints::new();
    let backend = |node: &str| ProjectionBackend {
        events: events.clone(),
        checkpoints: checkpoints.clone(),
        leadership: DriverLeadership::new(
            server.driver(),
            DatabaseId::new("projections"),
            NodeId::new(node),
        ),
    };

    // 19 events applied, the one at position 7 dead-lettered.
    let name = unique_name("metrics-dlq");
    let applied = Applied::default();
    let projector = TestProjector::new(&name, "a", &applied).failing_at(7);
    let hook = RecordingDeadLetter::default();
    let cancel = CancellationToken::new();
    let run = {
        let (b, c, p, hook) = (
            backend("a"),
            cancel.clone(),
            projector.clone(),
            hook.clone(),
        );
        tokio::spawn(async move {
            ProjectionRunner::new(&p, &b)
                .options(options())
                .dead_letter(hook)
                .run(&c)
                .await
        })
    };
    until("19 events applied", || applied.all().len() == 19).await;
    cancel.cancel();
    run.await.expect("task").expect("a clean stop");
    let page = prometheus.render();
    let applied_total = "shardlock_projection_events_applied_total";
    let dead_total = "shardlock_projection_events_dead_lettered_total";
    assert_eq!(counter(&page, applied_total, &name), Some(19.0), "{page}");
    assert_eq!(counter(&page, dead_total, &name), Some(1.0), "{page}");

    // A newer leader claims while this one runs: its next checkpoint write
    // is refused and counted.
    let name = unique_name("metrics-fenced");
    let applied = Applied::default();
    let projector = TestProjector::new(&name, "stale", &applied).slow(Duration::from_millis(20));
    let cancel = CancellationToken::new();
    let run = {
        let (b, c, p) = (backend("stale"), cancel.clone(), projector.clone());
        tokio::spawn(async move {
            ProjectionRunner::new(&p, &b)
                .options(options())
                .run(&c)
                .await
        })
    };
    until("the stale leader applying", || !applied.all().is_empty()).await;
    checkpoints.claim(&name).await.expect("a newer claim");
    let result = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the stale leader stops")
        .expect("task");
    assert!(
        matches!(result, Err(ProjectionError::FencedOff { .. })),
        "fenced off: {result:?}"
    );
    let page = prometheus.render();
    assert_eq!(
        counter(&page, "shardlock_fenced_writes_total", &name),
        Some(1.0),
        "{page}"
    );
    assert!(
        counter(&page, applied_total, &name).is_some_and(|n| n >= 1.0),
        "{page}"
    );
}
