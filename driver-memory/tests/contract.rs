//! The shared driver contract suite, run against the memory driver.

use shardlock_contract_tests::{until_waiting, Harness, Holder};
use shardlock_core::{BoxError, DatabaseId, Driver, LockKey, NodeId, Session};
use shardlock_memory::{MemoryDriver, MemoryServer, MemorySession};

struct MemoryHarness {
    server: MemoryServer,
}

impl Harness for MemoryHarness {
    type Driver = MemoryDriver;

    fn driver(&self) -> MemoryDriver {
        self.server.driver()
    }

    fn database(&self) -> DatabaseId {
        DatabaseId::new("contract")
    }

    async fn terminate(&self, session: &MemorySession) {
        self.server.terminate(session.id());
    }

    async fn spawn_holder(&self, keys: Vec<LockKey>) -> Result<Holder, BoxError> {
        // A separate driver stands for a separate process; `kill` frees its
        // locks the way a server does when the process's sockets close.
        let driver = self.server.driver();
        let mut session = driver
            .connect(&self.database(), &NodeId::new("holder"))
            .await?;
        let granted = session.try_acquire(&keys).await?;
        if !granted.iter().all(|g| *g) {
            return Err("holder could not take its keys".into());
        }
        Ok(Holder::new("memory holder", move || {
            driver.kill();
            // The "process" is gone: its session object never runs again.
            std::mem::forget(session);
        }))
    }

    fn round_trips(&self, _session: &MemorySession) -> Option<u64> {
        // The server's total: each test has a server of its own, and the
        // clauses count around one call while nothing else runs.
        Some(self.server.round_trips())
    }

    async fn wait_until_waiting(&self, key: &LockKey) -> bool {
        let db = self.database();
        until_waiting(self.settle(), key, "the memory server", || {
            self.server.waiting(&db, key)
        })
        .await
    }

    fn unreachable_driver(&self) -> Option<MemoryDriver> {
        // A node whose network is severed: its connects are refused.
        let driver = self.server.driver();
        driver.sever();
        Some(driver)
    }
}

async fn harness() -> Option<MemoryHarness> {
    Some(MemoryHarness {
        server: MemoryServer::new(),
    })
}

shardlock_contract_tests::driver_contract_tests!(harness().await);
