//! A memory session: one "connection" to one database of a [`MemoryServer`].

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use shardlock_core::{
    CancellationToken, DatabaseId, Holds, LockKey, Result, Session, SessionSignals,
};

use crate::server::{Grant, Health, Inner, LockEventKind, MemoryServer, SessionId, State};

/// A session on a [`MemoryServer`]; dropping it frees its locks at once
/// (unless its connection was cut, in which case the server frees them after
/// its release window).
///
/// Its bookkeeping (held keys, trust, loss signal) is core's [`Holds`]; the
/// server keeps a handle on the same [`SessionSignals`] and fires it when it
/// ends the session (see [`MemoryServer::terminate`]).
///
/// Every request to the server is a simulated round trip: the server applies
/// it when it "arrives", then the answer travels back (the task yields once)
/// before the session records it. A future dropped in between leaves the
/// server's effect in place and the session not knowing it, exactly as a
/// real database connection would; the session is then poisoned (see
/// [`try_acquire`](Session::try_acquire)).
pub struct MemorySession {
    server: MemoryServer,
    id: SessionId,
    holds: Holds,
}

impl MemorySession {
    pub(crate) fn new(
        server: MemoryServer,
        id: SessionId,
        database: DatabaseId,
        signals: SessionSignals,
    ) -> Self {
        Self {
            server,
            id,
            holds: Holds::with_signals(database, signals),
        }
    }

    /// This session's id on the server (for [`MemoryServer::terminate`]).
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// Waits while the session is partitioned; answers why it cannot reach
    /// the server if it is not up.
    async fn reachable(&self) -> std::result::Result<(), &'static str> {
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
                        return Err("server gone");
                    }
                }
                Health::Severed => return Err("connection reset"),
                Health::Dead => return Err("session terminated by the server"),
            }
        }
    }

    /// One round trip named `op`: `serve` runs on the server when the
    /// request arrives, then the answer travels back (one yield). Poisons
    /// the session if it cannot reach the server; a future dropped after
    /// `begin` poisons it at its next call (see [`Holds::begin`]).
    async fn round_trip<T>(
        &mut self,
        op: &'static str,
        serve: impl FnOnce(&Inner, &mut State, SessionId, &Holds) -> T,
    ) -> Result<T> {
        self.holds.begin(op)?;
        if let Err(reason) = self.reachable().await {
            self.holds.end();
            return Err(self.holds.poison(reason));
        }
        let answer = {
            let inner = &self.server.inner;
            let mut state = inner.lock();
            inner.count_round_trip();
            serve(inner, &mut state, self.id, &self.holds)
        };
        // The answer is on its way back: a future dropped here leaves the
        // server's effect applied and the session not knowing it.
        tokio::task::yield_now().await;
        self.holds.end();
        Ok(answer)
    }
}

/// Counts a session blocked in `acquire` until dropped (the acquire returns
/// or its future is dropped).
struct Waiting {
    inner: Arc<Inner>,
    slot: (DatabaseId, i64),
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.inner.remove_waiter(&self.slot);
    }
}

impl Session for MemorySession {
    fn holds(&self) -> &Holds {
        &self.holds
    }

    /// One round trip for the keys not held yet (none when all are held).
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe at the server: the server takes the keys when the
    /// request arrives, before the answer comes back. A future dropped in
    /// between leaves keys held on the server that the session does not know
    /// of; the session is then poisoned: its next call (e.g. `verify`) fails
    /// with `SessionLost` and its loss signal fires. Dropping the session
    /// frees every key on the server.
    async fn try_acquire(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        let ask = self.holds.pending(keys)?;
        if !ask.is_empty() {
            let granted = self
                .round_trip("try_acquire", |inner, state, id, holds| {
                    inner
                        .try_take_many(state, id, holds.database(), &ask)
                        .into_iter()
                        .map(|grant| matches!(grant, Grant::Granted))
                        .collect::<Vec<bool>>()
                })
                .await?;
            self.holds.record_acquired(&ask, &granted)?;
        }
        Ok(self.holds.answer(keys))
    }

    /// Waits for a wake-up from the server (no polling) until the key is
    /// free, `cancel` fires (`Ok(false)`) or the session is lost (an error).
    /// While it waits, [`MemoryServer::waiting`] counts it.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe, through `cancel` and by dropping the future: each
    /// attempt takes the key and records it in one step, with no await in
    /// between, so a cancelled or dropped wait never leaves the key held.
    async fn acquire(&mut self, key: &LockKey, cancel: &CancellationToken) -> Result<bool> {
        if self.holds.holding(key)? {
            return Ok(true);
        }
        let signals = self.holds.signals();
        let server = self.server.clone();
        let slot = (self.holds.database().clone(), key.id());
        let mut waiting: Option<Waiting> = None;
        loop {
            if let Err(reason) = self.reachable().await {
                return Err(self.holds.poison(reason));
            }
            // Register for wake-ups before trying, so a release between the
            // attempt and the wait is not missed.
            let freed = server.inner.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let inner = &server.inner;
                let mut state = inner.lock();
                inner.count_round_trip();
                match inner.try_take(&mut state, self.id, self.holds.database(), key) {
                    Grant::Granted => {
                        drop(state);
                        self.holds.insert(key.clone());
                        return Ok(true);
                    }
                    Grant::Denied if waiting.is_none() => {
                        inner.add_waiter(&mut state, slot.clone());
                        waiting = Some(Waiting {
                            inner: Arc::clone(inner),
                            slot: slot.clone(),
                        });
                    }
                    Grant::Denied => {}
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(false),
                _ = signals.lost().cancelled() => {
                    // `ready` turns the signal into the session's error.
                    self.holds.ready()?;
                }
                _ = &mut freed => {}
            }
        }
    }

    /// One round trip for the held keys among `keys` (none when none is
    /// held).
    async fn release_many(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        let ask = self.holds.pending_release(keys)?;
        if ask.is_empty() {
            return Ok(vec![false; keys.len()]);
        }
        let released = self
            .round_trip("release", |inner, state, id, holds| {
                inner.give_back_many(state, id, holds.database(), &ask, LockEventKind::Released)
            })
            .await?;
        Ok(self.holds.record_released(keys, &ask, &released))
    }

    /// Like [`release_many`](Session::release_many), in the same single round
    /// trip: while the server frees the keys it calls
    /// [`ReleaseHints::announce`](shardlock_core::ReleaseHints::announce) on
    /// every other reachable session of the database, with the ids of the
    /// released keys marked clean. Nothing is announced (and nothing sent)
    /// when none of `keys` is held; the releasing session never hears its
    /// own announcement.
    async fn release_announced(&mut self, keys: &[LockKey], clean: &[bool]) -> Result<Vec<bool>> {
        let ask = self.holds.pending_release(keys)?;
        if ask.is_empty() {
            return Ok(vec![false; keys.len()]);
        }
        let clean = shardlock_core::clean_ids(keys, clean);
        let released = self
            .round_trip("release_announced", |inner, state, id, holds| {
                let db = holds.database();
                let released = inner.give_back_many(state, id, db, &ask, LockEventKind::Released);
                if released.contains(&true) {
                    let marked: Vec<i64> = ask
                        .iter()
                        .zip(&released)
                        .filter(|(key, done)| **done && clean.contains(&key.id()))
                        .map(|(key, _)| key.id())
                        .collect();
                    let _ = inner.announce(state, id, db, &marked);
                }
                released
            })
            .await?;
        Ok(self.holds.record_released(keys, &ask, &released))
    }

    /// One round trip for the keys this session does not hold (none when it
    /// holds them all): the server looks at its lock table and takes
    /// nothing. A key held by a session the server has not freed yet (cut
    /// off, within its release window) counts as held, as `pg_locks` would
    /// show it.
    async fn probe(&mut self, keys: &[LockKey]) -> Result<Vec<bool>> {
        let ask = self.holds.pending(keys)?;
        if ask.is_empty() {
            return Ok(vec![false; keys.len()]);
        }
        let elsewhere = self
            .round_trip("probe", |inner, state, id, holds| {
                ask.iter()
                    .filter(|key| inner.held_elsewhere(state, id, holds.database(), key))
                    .map(LockKey::id)
                    .collect::<HashSet<i64>>()
            })
            .await?;
        Ok(keys
            .iter()
            .map(|key| !self.holds.contains(key) && elsewhere.contains(&key.id()))
            .collect())
    }

    async fn release_all(&mut self) -> Result<()> {
        self.holds.ready()?;
        if self.holds.is_empty() {
            return Ok(());
        }
        self.round_trip("release_all", |inner, state, id, holds| {
            let keys: Vec<LockKey> = holds.keys().cloned().collect();
            let _ =
                inner.give_back_many(state, id, holds.database(), &keys, LockEventKind::Released);
        })
        .await?;
        self.holds.clear();
        Ok(())
    }

    async fn verify(&mut self) -> Result<()> {
        let missing = self
            .round_trip("verify", |inner, state, id, holds| {
                inner.not_held(state, id, holds.database(), holds.keys())
            })
            .await?;
        if missing.is_empty() {
            Ok(())
        } else {
            Err(self.holds.poison(format!(
                "the server no longer shows {} of its locks: {missing:?}",
                missing.len()
            )))
        }
    }

    /// Releases every key and closes the connection. A poisoned session
    /// cannot release key by key, but closing its live connection still
    /// frees everything on the server; the error says it was lost.
    async fn close(mut self) -> Result<()> {
        let result = self.release_all().await;
        // `Drop` closes the connection: the server frees whatever is left
        // (a poisoned session's unknown keys) and forgets the session.
        drop(self);
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
            .field("holds", &self.holds)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use shardlock_core::{Driver, Error, NodeId};

    use super::*;

    fn keys(what: &str, n: usize) -> Vec<LockKey> {
        (0..n)
            .map(|i| LockKey::new(format!("unit-{what}-{i}")).unwrap())
            .collect()
    }

    async fn two_sessions(server: &MemoryServer) -> (MemorySession, MemorySession) {
        let db = DatabaseId::new("unit");
        let a = server
            .driver()
            .connect(&db, &NodeId::new("a"))
            .await
            .unwrap();
        let b = server
            .driver()
            .connect(&db, &NodeId::new("b"))
            .await
            .unwrap();
        (a, b)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_batch_is_one_round_trip_and_held_keys_cost_none() {
        let server = MemoryServer::new();
        let (mut a, _b) = two_sessions(&server).await;
        let k = keys("batch", 100);
        let before = server.round_trips();
        assert!(a.try_acquire(&k).await.unwrap().iter().all(|g| *g));
        assert_eq!(server.round_trips() - before, 1);
        assert!(a.try_acquire(&k).await.unwrap().iter().all(|g| *g));
        assert_eq!(
            server.round_trips() - before,
            1,
            "held keys are not asked again"
        );
        assert_eq!(a.held().len(), 100);
        assert_eq!(a.release_many(&k).await.unwrap(), vec![true; 100]);
        assert_eq!(server.round_trips() - before, 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_try_acquire_dropped_mid_flight_poisons_the_session() {
        let server = MemoryServer::new();
        let (mut a, mut b) = two_sessions(&server).await;
        let signals = a.signals();
        let k = keys("dropped", 1);
        {
            let fut = a.try_acquire(&k);
            tokio::pin!(fut);
            // Polled once: the request reached the server, the answer did not
            // come back; then the future is dropped.
            tokio::select! {
                biased;
                _ = &mut fut => panic!("a round trip answers after one yield, not at once"),
                () = std::future::ready(()) => {}
            }
        }
        assert_eq!(server.holder(a.database(), &k[0]), Some(a.id()));
        assert!(a.held().is_empty(), "the session never learnt of the grant");
        let err = a.verify().await.unwrap_err();
        assert!(err.is_session_fatal(), "{err}");
        assert!(err.to_string().contains("interrupted"), "{err}");
        assert!(signals.is_lost(), "poisoning fires the loss signal");
        assert_eq!(b.try_acquire(&k).await.unwrap(), vec![false]);
        drop(a);
        assert_eq!(
            b.try_acquire(&k).await.unwrap(),
            vec![true],
            "dropping frees it"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn terminate_kill_and_sever_fire_the_signal_partition_does_not() {
        let server = MemoryServer::new();
        let db = DatabaseId::new("unit");
        let driver = server.driver();
        let mut a = driver.connect(&db, &NodeId::new("a")).await.unwrap();
        let lost = a.signals();
        assert!(!lost.is_lost());
        server.terminate(a.id());
        assert!(lost.is_lost(), "fired synchronously by terminate");
        assert!(matches!(a.verify().await, Err(Error::SessionLost { .. })));

        let killed = server.driver();
        let k = killed.connect(&db, &NodeId::new("k")).await.unwrap();
        killed.kill();
        assert!(k.signals().is_lost());

        let cut = server.driver();
        let p = cut.connect(&db, &NodeId::new("p")).await.unwrap();
        cut.partition();
        assert!(!p.signals().is_lost(), "a partition is silent");
        cut.heal();
        assert!(
            p.signals().is_lost(),
            "the reset is seen once the network heals"
        );

        let severed = server.driver();
        let s = severed.connect(&db, &NodeId::new("s")).await.unwrap();
        severed.sever();
        assert!(s.signals().is_lost());
        assert_eq!(
            driver.capabilities().loss_detection_bound,
            Some(crate::LOSS_DETECTION_BOUND)
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn waiting_counts_blocked_acquires_until_they_end() {
        let server = MemoryServer::new();
        let (mut a, mut b) = two_sessions(&server).await;
        let k = keys("wait", 1);
        let db = a.database().clone();
        assert_eq!(a.try_acquire(&k).await.unwrap(), vec![true]);
        let cancel = CancellationToken::new();
        let waiter = tokio::spawn({
            let (key, cancel) = (k[0].clone(), cancel.clone());
            async move {
                let got = b.acquire(&key, &cancel).await;
                (b, got)
            }
        });
        while server.waiting(&db, &k[0]) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(server.waiting(&db, &k[0]), 1);
        assert!(a.release(&k[0]).await.unwrap());
        let (b, got) = waiter.await.unwrap();
        assert!(got.unwrap());
        assert_eq!(server.waiting(&db, &k[0]), 0);
        assert_eq!(server.holder(&db, &k[0]), Some(b.id()));
        assert_eq!(b.held(), k);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_acquire_fails_at_once_when_its_session_is_terminated() {
        let server = MemoryServer::new();
        let (mut a, mut b) = two_sessions(&server).await;
        let k = keys("terminated-waiter", 1);
        assert_eq!(a.try_acquire(&k).await.unwrap(), vec![true]);
        let b_id = b.id();
        let waiter = tokio::spawn({
            let key = k[0].clone();
            async move { b.acquire(&key, &CancellationToken::new()).await }
        });
        while server.waiting(a.database(), &k[0]) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        server.terminate(b_id);
        let err = waiter.await.unwrap().unwrap_err();
        assert!(err.is_session_fatal(), "{err}");
        assert_eq!(server.holder(a.database(), &k[0]), Some(a.id()));
    }
}
