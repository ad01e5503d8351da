//! A memory session: one "connection" to one database of a [`MemoryServer`].

use std::collections::BTreeMap;
use std::fmt;

use shardlock_core::{CancellationToken, DatabaseId, Error, LockKey, Result, Session};

use crate::server::{Grant, Health, LockEventKind, MemoryServer, SessionId};

/// A session on a [`MemoryServer`]; dropping it frees its locks at once
/// (unless its connection was cut, in which case the server frees them after
/// its release window).
pub struct MemorySession {
    server: MemoryServer,
    id: SessionId,
    database: DatabaseId,
    held: BTreeMap<i64, LockKey>,
    closed: bool,
}

impl MemorySession {
    pub(crate) fn new(server: MemoryServer, id: SessionId, database: DatabaseId) -> Self {
        Self {
            server,
            id,
            database,
            held: BTreeMap::new(),
            closed: false,
        }
    }

    /// This session's id on the server (for [`MemoryServer::terminate`]).
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// Waits while the session is partitioned, then fails if it is not up.
    async fn reachable(&self) -> Result<()> {
        let mut health_changes = self.server.inner.health.subscribe();
        loop {
            let health = {
                let state = self.server.inner.lock();
                state
                    .sessions
                    .get(&self.id)
                    .map(|r| r.health)
                    .unwrap_or(Health::Dead)
            };
            match health {
                Health::Up => return Ok(()),
                Health::Partitioned => {
                    // Hangs like a cut network: only a heal wakes it.
                    if health_changes.changed().await.is_err() {
                        return Err(self.lost("server gone"));
                    }
                }
                Health::Severed => return Err(self.lost("connection reset")),
                Health::Dead => return Err(self.lost("session terminated by the server")),
            }
        }
    }

    fn lost(&self, reason: &str) -> Error {
        Error::session_lost(&self.database, reason)
    }

    fn ensure_open(&self) -> Result<()> {
        if self.closed {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    /// One atomic attempt on the server.
    fn attempt(&mut self, key: &LockKey) -> bool {
        let inner = &self.server.inner;
        let mut state = inner.lock();
        match inner.try_take(&mut state, self.id, &self.database, key) {
            Grant::Granted => {
                self.held.insert(key.id(), key.clone());
                true
            }
            Grant::Denied => false,
        }
    }
}

impl Session for MemorySession {
    fn database(&self) -> &DatabaseId {
        &self.database
    }

    fn held(&self) -> Vec<LockKey> {
        self.held.values().cloned().collect()
    }

    async fn try_acquire(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        self.ensure_open()?;
        self.reachable().await?;
        self.server.inner.count_round_trip();
        Ok(keys.iter().map(|key| self.attempt(key)).collect())
    }

    async fn acquire(&mut self, key: &LockKey, cancel: &CancellationToken) -> Result<bool> {
        self.ensure_open()?;
        let server = self.server.clone();
        loop {
            self.reachable().await?;
            // Register for wake-ups before trying, so a release between the
            // attempt and the wait is not missed.
            let freed = server.inner.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            self.server.inner.count_round_trip();
            if self.attempt(key) {
                return Ok(true);
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(false),
                _ = &mut freed => {}
            }
        }
    }

    async fn release(&mut self, key: &LockKey) -> Result<bool> {
        self.ensure_open()?;
        self.reachable().await?;
        self.server.inner.count_round_trip();
        self.held.remove(&key.id());
        let inner = &self.server.inner;
        let mut state = inner.lock();
        Ok(inner.give_back(
            &mut state,
            self.id,
            &self.database,
            key,
            LockEventKind::Released,
        ))
    }

    async fn release_many(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        self.ensure_open()?;
        self.reachable().await?;
        self.server.inner.count_round_trip();
        let inner = &self.server.inner;
        let mut state = inner.lock();
        Ok(keys
            .iter()
            .map(|key| {
                self.held.remove(&key.id());
                inner.give_back(
                    &mut state,
                    self.id,
                    &self.database,
                    key,
                    LockEventKind::Released,
                )
            })
            .collect())
    }

    async fn release_all(&mut self) -> Result<()> {
        self.ensure_open()?;
        self.reachable().await?;
        self.server.inner.count_round_trip();
        let inner = &self.server.inner;
        let mut state = inner.lock();
        for key in std::mem::take(&mut self.held).into_values() {
            inner.give_back(
                &mut state,
                self.id,
                &self.database,
                &key,
                LockEventKind::Released,
            );
        }
        Ok(())
    }

    async fn verify(&mut self) -> Result<()> {
        self.ensure_open()?;
        self.reachable().await?;
        self.server.inner.count_round_trip();
        let inner = &self.server.inner;
        let state = inner.lock();
        let missing: Vec<&str> = self
            .held
            .values()
            .filter(|key| !inner.holds(&state, self.id, &self.database, key))
            .map(LockKey::name)
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(self.lost(&format!(
                "the server no longer shows {} of its locks: {missing:?}",
                missing.len()
            )))
        }
    }

    async fn close(mut self) -> Result<()> {
        let result = self.release_all().await;
        self.closed = true;
        let inner = &self.server.inner;
        let mut state = inner.lock();
        inner.forget_session(&mut state, self.id);
        result
    }
}

impl Drop for MemorySession {
    fn drop(&mut self) {
        let inner = &self.server.inner;
        let mut state = inner.lock();
        let health = state.sessions.get(&self.id).map(|r| r.health);
        match health {
            // A live connection closes: the server frees its locks now.
            Some(Health::Up) => {
                inner.free_session(&mut state, self.id, LockEventKind::Released);
                inner.forget_session(&mut state, self.id);
            }
            // A cut connection: the server finds out after its window.
            Some(Health::Severed | Health::Partitioned) => {}
            Some(Health::Dead) => inner.forget_session(&mut state, self.id),
            None => {}
        }
    }
}

impl fmt::Debug for MemorySession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySession")
            .field("id", &self.id)
            .field("database", &self.database)
            .field("held", &self.held.len())
            .finish()
    }
}
