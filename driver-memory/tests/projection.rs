//! Projection runner scenarios and the checkpoint-store contract on the
//! memory backend.

use shardlock_contract_tests::{until_waiting, Harness, Holder, ProjectionHarness};
use shardlock_core::{BoxError, DatabaseId, LockKey, NodeId};
use shardlock_memory::{
    MemoryCheckpoints, MemoryDriver, MemoryEventLog, MemoryServer, MemorySession,
};

struct MemoryProjectionHarness {
    server: MemoryServer,
    checkpoints: MemoryCheckpoints,
}

impl Harness for MemoryProjectionHarness {
    type Driver = MemoryDriver;

    fn driver(&self) -> MemoryDriver {
        self.server.driver()
    }

    fn database(&self) -> DatabaseId {
        DatabaseId::new("projections")
    }

    async fn terminate(&self, session: &MemorySession) {
        self.server.terminate(session.id());
    }

    async fn spawn_holder(&self, _keys: Vec<LockKey>) -> Result<Holder, BoxError> {
        Err("not used by the projection scenarios".into())
    }

    async fn wait_until_waiting(&self, key: &LockKey) -> bool {
        let db = self.database();
        until_waiting(self.settle(), key, "the memory server", || {
            self.server.waiting(&db, key)
        })
        .await
    }
}

impl ProjectionHarness for MemoryProjectionHarness {
    type Events = MemoryEventLog<i64>;
    type Checkpoints = MemoryCheckpoints;

    async fn stream(&self, n: usize) -> MemoryEventLog<i64> {
        let log = MemoryEventLog::new();
        for i in 1..=n as i64 {
            assert_eq!(log.append(i), i);
        }
        log
    }

    async fn checkpoints(&self) -> MemoryCheckpoints {
        self.checkpoints.clone()
    }

    async fn kill_node(&self, node: &NodeId) {
        self.server.terminate_node(node);
    }
}

async fn harness() -> Option<MemoryProjectionHarness> {
    Some(MemoryProjectionHarness {
        server: MemoryServer::new(),
        checkpoints: MemoryCheckpoints::connect()
            .await
            .expect("an in-process store"),
    })
}

shardlock_contract_tests::projection_tests!(harness().await);

/// The runner as a coordinator agent: each shard is one projection; when its
/// node stops, the projection moves with the lock and resumes from its
/// checkpoint, skipping nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_agent_moves_with_its_lock() {
    use std::time::Duration;

    use shardlock_contract_tests::{Applied, TestProjector};
    use shardlock_core::{
        CheckpointStore, Coordinator, ProjectionAgent, ProjectionOptions, ShardId,
    };
    use shardlock_distributors::SingleTenant;

    const TOTAL: i64 = 400;
    let server = MemoryServer::new();
    let log = MemoryEventLog::new();
    for i in 1..=TOTAL {
        log.append(i);
    }
    let checkpoints = MemoryCheckpoints::connect().await.expect("store");
    let applied = Applied::default();
    let shards = [ShardId::new("orders-view"), ShardId::new("totals-view")];
    let start = |node: &'static str| {
        let (log, checkpoints, applied) = (log.clone(), checkpoints.clone(), applied.clone());
        let agent =
            ProjectionAgent::new(move |shard: &ShardId, ctx: &shardlock_core::AgentContext| {
                let projector = TestProjector::new(shard.as_str(), ctx.node.as_str(), &applied)
                    .slow(Duration::from_millis(1));
                Ok((
                    projector,
                    shardlock_core::ProjectionBackend {
                        events: log.clone(),
                        checkpoints: checkpoints.clone(),
                        leadership: (),
                    },
                ))
            })
            .options(ProjectionOptions::default().batch_size(20));
        Coordinator::builder(
            server.driver(),
            SingleTenant::new(DatabaseId::new("db"), "app", shards.clone()),
            agent,
        )
        .node_id(node)
        .poll_interval(Duration::from_millis(100))
        .start_jitter(Duration::ZERO)
        .build()
        .expect("config")
        .start()
        .expect("start")
    };
    let a = start("node-a");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let b = start("node-b");
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.stop().await.expect("stop a");
    let mut finished = false;
    for _ in 0..300 {
        let mut done = true;
        for shard in &shards {
            let cp = checkpoints.load(shard.as_str()).await.expect("load");
            done &= cp.map(|c| c.position) == Some(TOTAL);
        }
        if done {
            finished = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(finished, "both projections reached the end");
    for shard in &shards {
        let cp = checkpoints
            .load(shard.as_str())
            .await
            .expect("load")
            .expect("row");
        assert!(cp.epoch >= 1);
    }
    let runners: std::collections::BTreeSet<String> =
        applied.all().into_iter().map(|(who, _)| who).collect();
    assert!(runners.contains("node-b"), "node-b took over: {runners:?}");
    b.stop().await.expect("stop b");
}
