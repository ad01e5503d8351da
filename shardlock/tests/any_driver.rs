//! The contract suite through `AnyDriver`: static dispatch must keep every
//! behaviour of the driver it wraps.

use shardlock::memory::{MemoryDriver, MemoryServer};
use shardlock::{AnyDriver, AnySession, BoxError, DatabaseId, Driver, LockKey, NodeId, Session};
use shardlock_contract_tests::{Harness, Holder};

struct AnyMemoryHarness {
    server: MemoryServer,
}

impl Harness for AnyMemoryHarness {
    type Driver = AnyDriver;

    fn driver(&self) -> AnyDriver {
        self.server.driver().into()
    }

    fn database(&self) -> DatabaseId {
        DatabaseId::new("any")
    }

    async fn terminate(&self, session: &AnySession) {
        match session {
            AnySession::Memory(s) => self.server.terminate(s.id()),
            other => panic!("this harness only makes memory sessions, got {other:?}"),
        }
    }

    async fn spawn_holder(&self, keys: Vec<LockKey>) -> Result<Holder, BoxError> {
        let driver: MemoryDriver = self.server.driver();
        let mut session = AnyDriver::from(driver.clone())
            .connect(&self.database(), &NodeId::new("holder"))
            .await?;
        if !session.try_acquire(&keys).await?.iter().all(|g| *g) {
            return Err("holder could not take its keys".into());
        }
        Ok(Holder::new("memory holder via AnyDriver", move || {
            driver.kill();
            std::mem::forget(session);
        }))
    }
}

async fn harness() -> Option<AnyMemoryHarness> {
    Some(AnyMemoryHarness {
        server: MemoryServer::new(),
    })
}

shardlock_contract_tests::driver_contract_tests!(harness().await);
