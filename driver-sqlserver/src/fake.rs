//! A simulated SQL Server for the driver's own tests.
//!
//! It answers the driver's batches, recognised by their text, from an
//! in-memory table of session-owned application locks with the documented
//! semantics of `sp_getapplock` / `sp_releaseapplock` / `APPLOCK_MODE`:
//! names compared binary, a second acquire by the owner stacks, a timed
//! request waits server-side and is granted as soon as the holder releases,
//! a session's locks are freed when its connection closes or it is killed.
//! It decodes the names exactly as the server would receive them (the JSON
//! array parameter, or one parameter per name, checked against the SQL
//! text), and builds tiberius rows with the columns the driver reads.
//!
//! Each simulated connection also has a socket: an in-memory duplex pipe
//! whose client end is the driver's real [`WatchedStream`] (the pump and the
//! loss signal of production) and whose server end a small task of the fake
//! server owns. [`FakeServer::kill`] ends a session as `KILL` does: the
//! locks are freed, the server end writes its goodbye message and closes,
//! and the pump sees the end and fires the session's loss signal, with no
//! request running. A request that runs on a killed connection reads the
//! goodbye message from the stream (as tiberius reads the server's error)
//! and fails with it.
//!
//! It proves the session logic, the connection task (ordering, abandoned
//! requests, drop), the loss signal and the batch/row plumbing, and runs the
//! whole contract suite. It cannot prove the T-SQL against a real server.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use shardlock_contract_tests::{Harness, Holder};
use shardlock_core::{
    BoxError, Capabilities, DatabaseId, Driver, LockKey, NodeId, Result, Session, Support,
};
use tiberius::{ColumnData, ColumnType, Row};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, WriteHalf};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::connection::{Connection, ServerInfo, Wire};
use crate::options::DEFAULT_LOSS_SIGNAL_BOUND;
use crate::session::MssqlSession;
use crate::sql::{self, Batch, KeyList, Param, NOT_HELD};
use crate::watch::WatchedStream;

/// What a killed session's server end sends before it closes.
pub(crate) const KILL_MESSAGE: &str = "Session was killed by an administrator (fake server)";

/// The simulated server.
#[derive(Clone, Default)]
pub(crate) struct FakeServer {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    freed: Notify,
}

#[derive(Default)]
struct State {
    next_spid: i32,
    /// (database, resource) → (owner spid, stack count).
    locks: HashMap<(String, String), (i32, u32)>,
    /// Sessions ended by `kill`.
    dead: HashSet<i32>,
    /// Forced `sp_getapplock` return codes per resource.
    codes: HashMap<String, i32>,
    /// Resources whose lock batches fail with an error.
    failing: HashSet<String>,
    /// Delay before a lock batch takes effect (the request is on the wire).
    delay: Duration,
    /// A different @@SPID reported by verify.
    spid_override: Option<i32>,
    /// Batches run per kind, for round-trip counts.
    batches: HashMap<&'static str, usize>,
    /// Per connection: ends it from the server side with a goodbye message.
    hang_up: HashMap<i32, oneshot::Sender<Vec<u8>>>,
    /// Requests waiting server-side, per resource.
    waiting: HashMap<String, usize>,
    /// Fenced-transaction batches per connection, in order (`begin`,
    /// `commit`, `rollback`, or the statement's text): logged, not
    /// interpreted.
    transactions: HashMap<i32, Vec<String>>,
}

impl FakeServer {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection: its socket (a duplex pipe; the client end watched
    /// like a TCP socket) and the task serving the server end. Needs a tokio
    /// runtime.
    fn wire(&self, database: &DatabaseId) -> FakeWire {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (hang_up, hung_up) = oneshot::channel();
        let spid = {
            let mut state = self.lock();
            state.next_spid += 1;
            let spid = 50 + state.next_spid;
            state.hang_up.insert(spid, hang_up);
            spid
        };
        tokio::spawn(serve_socket(server, hung_up));
        let (read, write) = tokio::io::split(client);
        FakeWire {
            server: self.clone(),
            spid,
            database: database.to_string(),
            stream: WatchedStream::new(read, write),
        }
    }

    /// Ends a session as `KILL` does: its locks are freed at once, and its
    /// connection is closed from the server side after a goodbye message
    /// ([`KILL_MESSAGE`]), whether or not a request is running.
    pub(crate) fn kill(&self, spid: i32) {
        self.kill_with(spid, KILL_MESSAGE);
    }

    /// As [`kill`](Self::kill), with this goodbye message.
    pub(crate) fn kill_with(&self, spid: i32, message: &str) {
        let mut state = self.lock();
        state.dead.insert(spid);
        state.locks.retain(|_, (owner, _)| *owner != spid);
        let hang_up = state.hang_up.remove(&spid);
        drop(state);
        if let Some(hang_up) = hang_up {
            let _ = hang_up.send(message.as_bytes().to_vec());
        }
        self.inner.freed.notify_waiters();
    }

    /// Frees one lock behind its owner's back.
    pub(crate) fn steal(&self, resource: &str) {
        self.lock().locks.retain(|(_, r), _| r != resource);
        self.inner.freed.notify_waiters();
    }

    /// The owner and stack count of `resource`.
    pub(crate) fn holder(&self, resource: &str) -> Option<(i32, u32)> {
        self.lock()
            .locks
            .iter()
            .find(|((_, r), _)| r == resource)
            .map(|(_, v)| *v)
    }

    pub(crate) fn force_code(&self, resource: &str, code: i32) {
        self.lock().codes.insert(resource.to_string(), code);
    }

    pub(crate) fn fail_batches_with(&self, resource: &str) {
        self.lock().failing.insert(resource.to_string());
    }

    pub(crate) fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    pub(crate) fn set_spid_override(&self, spid: Option<i32>) {
        self.lock().spid_override = spid;
    }

    /// How many requests wait server-side for `resource`.
    pub(crate) fn waiters(&self, resource: &str) -> usize {
        self.lock().waiting.get(resource).copied().unwrap_or(0)
    }

    /// The fenced-transaction batches `spid` sent, in order.
    pub(crate) fn transaction_log(&self, spid: i32) -> Vec<String> {
        self.lock()
            .transactions
            .get(&spid)
            .cloned()
            .unwrap_or_default()
    }

    pub(crate) fn batches(&self, kind: &str) -> usize {
        self.lock().batches.get(kind).copied().unwrap_or(0)
    }

    fn free_session(&self, spid: i32) {
        self.lock().locks.retain(|_, (owner, _)| *owner != spid);
        self.inner.freed.notify_waiters();
    }
}

/// The server end of one connection: reads (and ignores) what the client
/// sends; closes when the client closes, or after the goodbye message when
/// the server hangs up.
async fn serve_socket(mut socket: DuplexStream, mut hung_up: oneshot::Receiver<Vec<u8>>) {
    let mut sink = vec![0u8; 4096];
    loop {
        tokio::select! {
            message = &mut hung_up => {
                if let Ok(message) = message {
                    let _ = socket.write_all(&message).await;
                }
                return; // dropping the end closes the connection
            }
            read = socket.read(&mut sink) => match read {
                Ok(0) | Err(_) => return, // the client closed: so does the server
                Ok(_) => {}
            },
        }
    }
}

/// Counts a request as waiting for a resource while it lives.
struct Waiting<'a> {
    server: &'a FakeServer,
    resource: String,
}

impl<'a> Waiting<'a> {
    fn new(server: &'a FakeServer, resource: &str) -> Self {
        *server
            .lock()
            .waiting
            .entry(resource.to_string())
            .or_default() += 1;
        Self {
            server,
            resource: resource.to_string(),
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut state = self.server.lock();
        if let Some(n) = state.waiting.get_mut(&self.resource) {
            *n -= 1;
            if *n == 0 {
                state.waiting.remove(&self.resource);
            }
        }
    }
}

/// One simulated connection.
pub(crate) struct FakeWire {
    server: FakeServer,
    spid: i32,
    database: String,
    /// The socket, as tiberius would hold it.
    stream: WatchedStream<WriteHalf<DuplexStream>>,
}

fn int_row(columns: &[(&str, i32)]) -> Row {
    columns
        .iter()
        .fold(Row::builder(), |b, (name, v)| {
            b.column(*name, ColumnType::Int4, ColumnData::I32(Some(*v)))
        })
        .build()
}

fn reset() -> tiberius::error::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "connection reset by peer",
    )
    .into()
}

/// The names a batch carries, decoded as the server would, checked against
/// the SQL text and the batch's count.
fn names(batch: &Batch) -> Vec<String> {
    let names: Vec<String> = if batch.sql.contains("FROM OPENJSON(@P1)") {
        assert_eq!(batch.params.len(), 1, "JSON mode binds one parameter");
        let Param::Text(json) = &batch.params[0] else {
            panic!("JSON parameter must be text")
        };
        serde_json::from_str(json).expect("the JSON parameter is a valid array of strings")
    } else {
        assert!(batch.params.len() <= sql::MAX_PARAMS_PER_BATCH);
        batch
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                assert!(
                    batch.sql.contains(&format!("({i}, @P{})", i + 1)),
                    "parameter {} is not in the VALUES rows",
                    i + 1
                );
                match p {
                    Param::Text(s) => s.clone(),
                    Param::Int(_) => panic!("names are text"),
                }
            })
            .collect()
    };
    assert_eq!(names.len(), batch.names, "the batch's name count");
    for name in &names {
        assert!(sql::utf16_len(name) <= sql::MAX_RESOURCE_UTF16, "{name}");
    }
    names
}

impl FakeWire {
    fn is_dead(&self, state: &State) -> bool {
        state.dead.contains(&self.spid)
    }

    /// The error a request on a killed connection gets: what the server sent
    /// before it closed, read from the socket as tiberius would.
    async fn killed(&mut self) -> tiberius::error::Error {
        let mut goodbye = Vec::new();
        let read = tokio::time::timeout(
            Duration::from_secs(1),
            self.stream.read_to_end(&mut goodbye),
        )
        .await;
        if !matches!(read, Ok(Ok(_))) || goodbye.is_empty() {
            return reset();
        }
        std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            format!(
                "the server closed the connection: {}",
                String::from_utf8_lossy(&goodbye)
            ),
        )
        .into()
    }

    fn take(&self, state: &mut State, resource: &str) -> bool {
        let key = (self.database.clone(), resource.to_string());
        match state.locks.get_mut(&key) {
            None => {
                state.locks.insert(key, (self.spid, 1));
                true
            }
            Some((owner, count)) if *owner == self.spid => {
                *count += 1; // SQL Server stacks
                true
            }
            Some(_) => false,
        }
    }

    fn holds(&self, state: &State, resource: &str) -> bool {
        state
            .locks
            .get(&(self.database.clone(), resource.to_string()))
            .is_some_and(|(owner, _)| *owner == self.spid)
    }

    fn count(&self, kind: &'static str) {
        *self.server.lock().batches.entry(kind).or_default() += 1;
    }

    async fn slice(&mut self, batch: &Batch) -> Result<Vec<Row>, tiberius::error::Error> {
        let (Param::Text(resource), Param::Int(timeout_ms)) = (&batch.params[0], &batch.params[1])
        else {
            panic!("slice parameters: {:?}", batch.params)
        };
        let deadline =
            Instant::now() + Duration::from_millis(u64::try_from(*timeout_ms).unwrap_or(0));
        let mut waited = false;
        let server = self.server.clone();
        loop {
            let freed = server.inner.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let dead = {
                let mut state = self.server.lock();
                if self.is_dead(&state) {
                    true
                } else if let Some(code) = state.codes.get(resource) {
                    return Ok(vec![int_row(&[("r", *code)])]);
                } else if self.take(&mut state, resource) {
                    return Ok(vec![int_row(&[("r", i32::from(waited))])]);
                } else {
                    false
                }
            };
            if dead {
                return Err(self.killed().await);
            }
            let timed_out = {
                let _waiting = Waiting::new(&server, resource);
                tokio::time::timeout_at(deadline, freed).await.is_err()
            };
            if timed_out {
                return Ok(vec![int_row(&[("r", -1)])]);
            }
            waited = true;
        }
    }
}

impl Wire for FakeWire {
    async fn run(&mut self, batch: &Batch) -> Result<Vec<Row>, tiberius::error::Error> {
        let dead = self.is_dead(&self.server.lock());
        if dead {
            return Err(self.killed().await);
        }
        let sql = batch.sql.as_str();
        if sql == sql::PING {
            self.count("ping");
            return Ok(vec![int_row(&[("spid", self.spid)])]);
        }
        if sql.contains("@LockTimeout = @P2") {
            self.count("acquire");
            return self.slice(batch).await;
        }
        let kind = if sql.contains("sp_getapplock") {
            assert!(sql.contains("@LockTimeout = 0"));
            "try_acquire"
        } else if sql.contains("sp_releaseapplock") {
            "release"
        } else if sql.contains("APPLOCK_MODE(N'public', name, N'Session')") {
            "verify"
        } else {
            return Err(tiberius::error::Error::Protocol(
                format!("fake server: unknown batch {sql}").into(),
            ));
        };
        self.count(kind);
        let names = names(batch);
        let delay = self.server.lock().delay;
        if kind != "verify" && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self.is_dead(&self.server.lock()) {
            return Err(self.killed().await);
        }
        let mut state = self.server.lock();
        if kind != "verify" && names.iter().any(|n| state.failing.contains(n)) {
            return Err(tiberius::error::Error::Conversion(
                "injected failure".into(),
            ));
        }
        let spid = state.spid_override.unwrap_or(self.spid);
        let mut rows = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let i = i32::try_from(i).unwrap_or(i32::MAX);
            match kind {
                "try_acquire" => {
                    let forced = state.codes.get(name).copied();
                    let code = match forced {
                        Some(code) => code,
                        None if self.take(&mut state, name) => 0,
                        None => -1,
                    };
                    rows.push(int_row(&[("i", i), ("r", code)]));
                }
                "release" => {
                    let key = (self.database.clone(), name.clone());
                    let code = match state.locks.get_mut(&key) {
                        Some((owner, count)) if *owner == self.spid => {
                            *count -= 1;
                            if *count == 0 {
                                state.locks.remove(&key);
                            }
                            0
                        }
                        _ => NOT_HELD,
                    };
                    rows.push(int_row(&[("i", i), ("r", code)]));
                }
                _ => {
                    let mode = if self.holds(&state, name) {
                        "Exclusive"
                    } else {
                        "NoLock"
                    };
                    rows.push(
                        Row::builder()
                            .column("spid", ColumnType::Int4, ColumnData::I32(Some(spid)))
                            .column("i", ColumnType::Int4, ColumnData::I32(Some(i)))
                            .column(
                                "mode",
                                ColumnType::NVarchar,
                                ColumnData::String(Some(mode.into())),
                            )
                            .build(),
                    );
                }
            }
        }
        drop(state);
        if kind == "release" {
            self.server.inner.freed.notify_waiters();
        }
        Ok(rows)
    }

    /// Fenced-transaction control batches are recognised and logged only:
    /// the fake proves their order and the plumbing, not the T-SQL.
    async fn plain(&mut self, sql: &str) -> Result<(), tiberius::error::Error> {
        let dead = self.is_dead(&self.server.lock());
        if dead {
            return Err(self.killed().await);
        }
        let kind = if sql == sql::BEGIN_FENCED {
            "begin"
        } else if sql == sql::COMMIT_FENCED {
            "commit"
        } else if sql == sql::ROLLBACK_FENCED {
            "rollback"
        } else {
            return Err(tiberius::error::Error::Protocol(
                format!("fake server: unknown plain batch {sql}").into(),
            ));
        };
        self.count(kind);
        let mut state = self.server.lock();
        state
            .transactions
            .entry(self.spid)
            .or_default()
            .push(kind.to_string());
        Ok(())
    }

    /// A statement is logged; one whose text contains `fail` fails as a
    /// statement error would (the connection stays usable).
    async fn statement(
        &mut self,
        sql: &str,
        _params: Vec<ColumnData<'static>>,
        _rows: bool,
    ) -> Result<crate::connection::Statement, tiberius::error::Error> {
        let dead = self.is_dead(&self.server.lock());
        if dead {
            return Err(self.killed().await);
        }
        self.count("statement");
        self.server
            .lock()
            .transactions
            .entry(self.spid)
            .or_default()
            .push(sql.to_string());
        if sql.contains("fail") {
            return Err(tiberius::error::Error::Conversion(
                "injected statement failure".into(),
            ));
        }
        Ok(crate::connection::Statement {
            rows: Vec::new(),
            affected: 1,
        })
    }

    async fn close(mut self) -> Result<(), tiberius::error::Error> {
        // As tiberius does: shut the socket's write side down; the server
        // closes its end in turn. Drop frees the session.
        self.stream
            .shutdown()
            .await
            .map_err(tiberius::error::Error::from)
    }
}

impl Drop for FakeWire {
    fn drop(&mut self) {
        // The connection closed: the server ends the session.
        self.server.free_session(self.spid);
    }
}

/// A driver on the fake server, with the real session type.
#[derive(Clone)]
pub(crate) struct FakeDriver {
    pub(crate) server: FakeServer,
    key_list: KeyList,
    slice_ms: i32,
    /// Connects fail as with a closed port.
    unreachable: bool,
}

impl FakeDriver {
    pub(crate) fn new(server: FakeServer, key_list: KeyList) -> Self {
        Self {
            server,
            key_list,
            slice_ms: 1000,
            unreachable: false,
        }
    }

    /// A driver whose server refuses connections.
    pub(crate) fn unreachable(&self) -> Self {
        Self {
            unreachable: true,
            ..self.clone()
        }
    }

    pub(crate) fn open(&self, database: &DatabaseId) -> MssqlSession {
        let wire = self.server.wire(database);
        let info = ServerInfo {
            spid: wire.spid,
            product_version: "16.0.0.0-fake".to_string(),
            database: database.to_string(),
            key_list: self.key_list,
        };
        let signals = wire.stream.signals();
        MssqlSession::new(
            Connection::spawn(wire, info, signals),
            database.clone(),
            self.slice_ms,
        )
    }
}

impl Driver for FakeDriver {
    type Session = MssqlSession;

    fn name(&self) -> &'static str {
        "sqlserver-fake"
    }

    async fn connect(&self, database: &DatabaseId, _node: &NodeId) -> Result<MssqlSession> {
        if self.unreachable {
            let refused = std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "connection refused (fake server)",
            );
            return Err(shardlock_core::Error::connect(
                database,
                crate::MssqlError::Unreachable {
                    addr: "127.0.0.1:1".to_string(),
                    source: refused.into(),
                },
            ));
        }
        Ok(self.open(database))
    }

    /// The production driver's: the same watched stream.
    fn capabilities(&self) -> Capabilities {
        Capabilities::none().with_loss_signal(Support::Emulated, DEFAULT_LOSS_SIGNAL_BOUND)
    }
}

/// The contract suite's view of the fake server.
pub(crate) struct FakeHarness {
    driver: FakeDriver,
}

impl FakeHarness {
    pub(crate) fn new(key_list: KeyList) -> Self {
        Self {
            driver: FakeDriver::new(FakeServer::default(), key_list),
        }
    }
}

impl Harness for FakeHarness {
    type Driver = FakeDriver;

    fn driver(&self) -> FakeDriver {
        self.driver.clone()
    }

    fn database(&self) -> DatabaseId {
        DatabaseId::new("contract")
    }

    async fn terminate(&self, session: &MssqlSession) {
        self.driver.server.kill(session.spid());
    }

    fn round_trips(&self, session: &MssqlSession) -> Option<u64> {
        Some(session.round_trips())
    }

    async fn wait_until_waiting(&self, key: &LockKey) -> bool {
        let resource = sql::resource_name(key);
        let deadline = Instant::now() + self.settle();
        // The fake's own view; polling is fine in a test harness.
        while self.driver.server.waiters(&resource) == 0 {
            assert!(
                Instant::now() < deadline,
                "no session waits for {key} on the fake server within {:?}",
                self.settle()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    fn unreachable_driver(&self) -> Option<FakeDriver> {
        Some(self.driver.unreachable())
    }

    async fn spawn_holder(&self, keys: Vec<LockKey>) -> Result<Holder, BoxError> {
        // Another "process": its own session; kill ends it on the server.
        let mut session = self.driver.open(&self.database());
        let granted = session.try_acquire(&keys).await?;
        if !granted.iter().all(|g| *g) {
            return Err("holder could not take its keys".into());
        }
        let server = self.driver.server.clone();
        Ok(Holder::new("fake holder", move || {
            server.kill(session.spid());
            drop(session);
        }))
    }
}

/// The whole contract suite with names passed as one JSON parameter.
mod json_contract {
    use super::*;

    async fn harness() -> Option<FakeHarness> {
        Some(FakeHarness::new(KeyList::Json))
    }

    shardlock_contract_tests::driver_contract_tests!(harness().await);
}

/// The whole contract suite with one parameter per name.
mod parameters_contract {
    use super::*;

    async fn harness() -> Option<FakeHarness> {
        Some(FakeHarness::new(KeyList::Parameters))
    }

    shardlock_contract_tests::driver_contract_tests!(harness().await);
}

mod tests {
    use super::*;
    use crate::error::MssqlError;
    use shardlock_core::{CancellationToken, Error};

    fn setup(key_list: KeyList) -> (FakeDriver, DatabaseId) {
        (
            FakeDriver::new(FakeServer::default(), key_list),
            DatabaseId::new("main"),
        )
    }

    fn key(name: &str) -> LockKey {
        LockKey::new(shardlock_contract_tests::unique_name(name)).expect("valid")
    }

    fn driver_error(e: &Error) -> Option<&MssqlError> {
        std::error::Error::source(e)?.downcast_ref::<MssqlError>()
    }

    #[tokio::test]
    async fn a_batch_is_one_round_trip_and_never_stacks() {
        for list in [KeyList::Json, KeyList::Parameters] {
            let (driver, db) = setup(list);
            let mut a = driver.open(&db);
            let k = key("k");
            let keys = vec![k.clone(), k.clone(), key("other")];
            assert_eq!(a.try_acquire(&keys).await.unwrap(), vec![true, true, true]);
            assert_eq!(driver.server.batches("try_acquire"), 1);
            // Held keys are not sent again: no stacking on the server.
            assert_eq!(a.try_acquire(&keys).await.unwrap(), vec![true, true, true]);
            assert_eq!(driver.server.batches("try_acquire"), 1, "nothing to ask");
            assert_eq!(driver.server.holder(&resource(&k)).map(|h| h.1), Some(1));
            let mut b = driver.open(&db);
            assert_eq!(
                b.try_acquire(std::slice::from_ref(&k)).await.unwrap(),
                vec![false]
            );
            a.close().await.unwrap();
            assert_eq!(b.try_acquire(&[k]).await.unwrap(), vec![true]);
        }
    }

    fn resource(key: &LockKey) -> String {
        sql::resource_name(key)
    }

    #[tokio::test]
    async fn parameter_mode_takes_ceil_n_over_2000_round_trips() {
        let (driver, db) = setup(KeyList::Parameters);
        let mut a = driver.open(&db);
        let keys: Vec<LockKey> = (0..4001).map(|i| key(&format!("p{i}"))).collect();
        let granted = a.try_acquire(&keys).await.unwrap();
        assert!(granted.iter().all(|g| *g));
        assert_eq!(driver.server.batches("try_acquire"), 3);
        a.verify().await.unwrap();
        assert_eq!(driver.server.batches("verify"), 3);
        a.release_all().await.unwrap();
        assert_eq!(driver.server.batches("release"), 3);
        let (driver, db) = setup(KeyList::Json);
        let mut a = driver.open(&db);
        assert!(a.try_acquire(&keys).await.unwrap().iter().all(|g| *g));
        assert_eq!(driver.server.batches("try_acquire"), 1);
    }

    #[tokio::test]
    async fn a_dropped_try_acquire_poisons_but_leaves_nothing_held() {
        let (driver, db) = setup(KeyList::Json);
        let mut a = driver.open(&db);
        let signals = a.signals();
        let k = key("dropped");
        driver.server.set_delay(Duration::from_millis(200));
        // The request is sent; the future is dropped while the server works.
        let dropped = tokio::time::timeout(
            Duration::from_millis(50),
            a.try_acquire(std::slice::from_ref(&k)),
        )
        .await;
        assert!(dropped.is_err(), "still running: {dropped:?}");
        driver.server.set_delay(Duration::ZERO);
        assert!(a.held().is_empty());
        // The contract: a round trip interrupted mid-flight poisons.
        let e = a.verify().await.unwrap_err();
        assert!(e.is_session_fatal(), "{e:?}");
        assert!(e.to_string().contains("interrupted"), "{e}");
        assert!(signals.is_lost());
        // Yet the task finished the batch and released its grant: the
        // server holds nothing, even before the session is dropped.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(driver.server.holder(&resource(&k)), None);
        let mut b = driver.open(&db);
        assert_eq!(b.try_acquire(&[k]).await.unwrap(), vec![true]);
    }

    #[tokio::test]
    async fn a_dropped_acquire_releases_a_late_grant() {
        let (driver, db) = setup(KeyList::Json);
        let mut a = driver.open(&db);
        let mut b = driver.open(&db);
        let k = key("late");
        assert!(a.try_acquire(std::slice::from_ref(&k)).await.unwrap()[0]);
        let never = CancellationToken::new();
        let dropped = tokio::time::timeout(Duration::from_millis(100), b.acquire(&k, &never)).await;
        assert!(dropped.is_err());
        // The waiting slice is granted when a releases...
        assert!(a.release(&k).await.unwrap());
        // ...and the task gives it back before b's next request answers.
        b.verify().await.unwrap();
        assert!(b.held().is_empty());
        assert_eq!(driver.server.holder(&resource(&k)), None);
        assert_eq!(a.try_acquire(&[k]).await.unwrap(), vec![true]);
    }

    #[tokio::test]
    async fn a_cancel_that_races_a_grant_releases_it_before_answering() {
        let (driver, db) = setup(KeyList::Json);
        let mut a = driver.open(&db);
        let mut b = driver.open(&db);
        let k = key("race");
        assert!(a.try_acquire(std::slice::from_ref(&k)).await.unwrap()[0]);
        let cancel = CancellationToken::new();
        let (got, ()) = tokio::join!(b.acquire(&k, &cancel), async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            // Cancel first, then free the key while the slice still waits:
            // the slice is granted, and acquire must give it back.
            cancel.cancel();
            assert!(a.release(&k).await.unwrap());
        });
        assert!(!got.unwrap(), "a cancelled acquire answers false");
        assert!(b.held().is_empty());
        assert_eq!(
            driver.server.holder(&resource(&k)),
            None,
            "nothing held when it answers"
        );
    }

    #[tokio::test]
    async fn dropping_a_session_mid_wait_frees_its_locks_at_once() {
        let (driver, db) = setup(KeyList::Json);
        let mut a = driver.open(&db);
        let mut b = driver.open(&db);
        let (k, mine) = (key("wait"), key("mine"));
        assert!(a.try_acquire(std::slice::from_ref(&k)).await.unwrap()[0]);
        assert!(b.try_acquire(std::slice::from_ref(&mine)).await.unwrap()[0]);
        let never = CancellationToken::new();
        let _ = tokio::time::timeout(Duration::from_millis(50), b.acquire(&k, &never)).await;
        let started = std::time::Instant::now();
        drop(b);
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "drop does not block"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            driver.server.holder(&resource(&mine)),
            None,
            "freed without waiting for the slice"
        );
    }

    #[tokio::test]
    async fn verify_reports_a_lock_the_server_dropped() {
        let (driver, db) = setup(KeyList::Json);
        let mut a = driver.open(&db);
        let keys = [key("v1"), key("v2")];
        assert!(a.try_acquire(&keys).await.unwrap().iter().all(|g| *g));
        a.verify().await.unwrap();
        driver.server.steal(&resource(&keys[1]));
        let e = a.verify().await.unwrap_err();
        assert!(
            matches!(e, Error::SessionLost { .. }) && e.is_session_fatal(),
            "{e:?}"
        );
        assert!(e.to_string().contains(keys[1].name()), "{e}");
        // Lost for good.
        assert!(a
            .try_acquire(&[key("x")])
            .await
            .unwrap_err()
            .is_session_fatal());
    }

    #[tokio::test]
    async fn verify_reports_a_changed_server_session() {
        let (driver, db) = setup(KeyList::Json);
        let mut a = driver.open(&db);
        assert!(a.try_acquire(&[key("s")]).await.unwrap()[0]);
        driver.server.set_spid_override(Some(4242));
        let e = a.verify().await.unwrap_err();
        assert!(e.to_string().contains("4242"), "{e}");
        assert!(e.is_session_fatal());
    }

    #[tokio::test]
    async fn verify_without_locks_is_a_ping_and_detects_a_kill() {
        let (driver, db) = setup(KeyList::Json);
        let mut a = driver.open(&db);
        a.verify().await.unwrap();
        assert_eq!(driver.server.batches("ping"), 1);
        driver.server.kill(a.spid());
        let e = a.verify().await.unwrap_err();
        assert!(e.is_session_fatal(), "{e:?}");
        // Either the loss signal already refused the round trip, or the
        // request ran and read the server's goodbye.
        let report = e.report();
        assert!(
            matches!(driver_error(&e), Some(MssqlError::ConnectionLost { .. }))
                || report.contains("server closed the connection"),
            "{report}"
        );
        // Closing a lost session is fine: the server freed its locks.
        a.close().await.unwrap();
    }

    const SIGNAL_WITHIN: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn a_kill_while_idle_fires_the_loss_signal_without_a_request() {
        let (driver, db) = setup(KeyList::Json);
        let mut a = driver.open(&db);
        let keys = [key("idle1"), key("idle2")];
        assert!(a.try_acquire(&keys).await.unwrap().iter().all(|g| *g));
        let signals = a.signals();
        let trips = a.round_trips();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!signals.is_lost(), "an idle, healthy session is not lost");
        let killed_at = std::time::Instant::now();
        driver.server.kill(a.spid());
        tokio::time::timeout(SIGNAL_WITHIN, signals.lost().cancelled())
            .await
            .expect("the loss signal fires while the session is idle");
        let took = killed_at.elapsed();
        eprintln!("fake server: loss signalled {took:?} after KILL");
        assert_eq!(a.round_trips(), trips, "no request was needed to notice");
        let reason = signals.reason().unwrap_or_default();
        assert!(reason.contains("server closed the connection"), "{reason}");
        // Every later call is refused with that reason; held keys are lost.
        let e = a.verify().await.unwrap_err();
        assert!(matches!(e, Error::SessionLost { .. }), "{e:?}");
        assert!(
            e.to_string().contains("server closed the connection"),
            "{e}"
        );
        assert!(a
            .try_acquire(&[key("after")])
            .await
            .unwrap_err()
            .is_session_fatal());
        assert_eq!(a.round_trips(), trips, "refused without a round trip");
        for k in &keys {
            assert_eq!(driver.server.holder(&resource(k)), None);
        }
        a.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_request_running_when_killed_reads_the_servers_goodbye() {
        let (driver, db) = setup(KeyList::Json);
        let mut a = driver.open(&db);
        let mut b = driver.open(&db);
        let k = key("goodbye");
        assert!(a.try_acquire(std::slice::from_ref(&k)).await.unwrap()[0]);
        let b_signals = b.signals();
        let b_spid = b.spid();
        let never = CancellationToken::new();
        let (waited, ()) = tokio::join!(b.acquire(&k, &never), async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            driver
                .server
                .kill_with(b_spid, "Msg 596: session 52 was killed by KILL");
        });
        let e = waited.unwrap_err();
        assert!(e.is_session_fatal(), "{e:?}");
        // The bytes the server sent before closing reached the reader.
        assert!(
            e.report()
                .contains("Msg 596: session 52 was killed by KILL"),
            "{}",
            e.report()
        );
        tokio::time::timeout(SIGNAL_WITHIN, b_signals.lost().cancelled())
            .await
            .expect("signalled too");
        // a is untouched.
        a.verify().await.unwrap();
        assert!(!a.signals().is_lost());
    }

    #[tokio::test]
    async fn closing_or_dropping_a_session_is_not_a_loss() {
        let (driver, db) = setup(KeyList::Json);
        let mut a = driver.open(&db);
        let k = key("graceful");
        assert!(a.try_acquire(std::slice::from_ref(&k)).await.unwrap()[0]);
        let a_signals = a.signals();
        a.close().await.unwrap();
        let b = driver.open(&db);
        let b_signals = b.signals();
        drop(b);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!a_signals.is_lost(), "{:?}", a_signals.reason());
        assert!(!b_signals.is_lost(), "{:?}", b_signals.reason());
        assert_eq!(driver.server.holder(&resource(&k)), None);
    }

    #[test]
    fn a_runtime_that_shuts_down_signals_the_loss() {
        let (signals, _server) = std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let (driver, db) = setup(KeyList::Json);
            let (session, signals) = runtime.block_on(async {
                let mut a = driver.open(&db);
                assert!(a.try_acquire(&[key("rt")]).await.unwrap()[0]);
                let signals = a.signals();
                (a, signals)
            });
            assert!(!signals.is_lost());
            drop(runtime); // the connection task dies with it
            assert!(signals.is_lost(), "the connection task's end is a loss");
            drop(session);
            (signals, driver.server)
        })
        .join()
        .unwrap();
        assert!(signals.reason().unwrap_or_default().contains("runtime"));
    }

    #[tokio::test]
    async fn round_trips_count_batches() {
        let (driver, db) = setup(KeyList::Json);
        let mut a = driver.open(&db);
        assert_eq!(a.round_trips(), 0);
        let keys = [key("rt1"), key("rt2"), key("rt3")];
        assert!(a.try_acquire(&keys).await.unwrap().iter().all(|g| *g));
        assert_eq!(a.round_trips(), 1, "a batch is one round trip");
        assert!(a.try_acquire(&keys).await.unwrap().iter().all(|g| *g));
        assert_eq!(a.round_trips(), 1, "nothing to ask: no round trip");
        a.verify().await.unwrap();
        assert_eq!(a.round_trips(), 2);
        let batch = [keys[0].clone(), keys[1].clone(), key("no")];
        let released = a.release_many(&batch).await.unwrap();
        assert_eq!(released, vec![true, true, false]);
        assert_eq!(a.round_trips(), 3, "release_many is one batch");
        assert!(!a.release(&keys[0]).await.unwrap());
        assert_eq!(a.round_trips(), 3, "not held: no round trip");
        assert_eq!(driver.server.holder(&resource(&keys[0])), None);
        assert!(driver.server.holder(&resource(&keys[2])).is_some());
    }

    #[tokio::test]
    async fn releasing_a_lock_the_server_dropped_is_session_loss() {
        let (driver, db) = setup(KeyList::Json);
        let mut a = driver.open(&db);
        let k = key("gone");
        assert!(a.try_acquire(std::slice::from_ref(&k)).await.unwrap()[0]);
        driver.server.steal(&resource(&k));
        let e = a.release(&k).await.unwrap_err();
        assert!(e.is_session_fatal(), "{e:?}");
        // A key never held is a plain false, without a round trip.
        let (driver, db) = setup(KeyList::Json);
        let mut b = driver.open(&db);
        assert!(!b.release(&key("never")).await.unwrap());
        assert_eq!(driver.server.batches("release"), 0);
    }

    #[tokio::test]
    async fn failure_codes_are_typed_and_grants_in_the_batch_are_kept() {
        let (driver, db) = setup(KeyList::Json);
        let mut a = driver.open(&db);
        let (ok, bad) = (key("ok"), key("bad"));
        driver.server.force_code(&resource(&bad), -999);
        let e = a.try_acquire(&[ok.clone(), bad.clone()]).await.unwrap_err();
        assert!(!e.is_session_fatal(), "{e:?}");
        assert!(matches!(
            driver_error(&e),
            Some(MssqlError::LockRequest {
                failure: crate::AppLockFailure::CallError,
                ..
            })
        ));
        assert_eq!(a.held(), vec![ok.clone()], "the granted key is tracked");
        a.verify().await.unwrap();

        let deadlocked = key("deadlock");
        driver.server.force_code(&resource(&deadlocked), -3);
        let e = a
            .acquire(&deadlocked, &CancellationToken::new())
            .await
            .unwrap_err();
        assert!(
            driver_error(&e).is_some_and(MssqlError::is_deadlock),
            "{e:?}"
        );
        assert!(!e.is_session_fatal());
        a.verify().await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_lock_batch_closes_the_connection_and_frees_everything() {
        let (driver, db) = setup(KeyList::Json);
        let mut a = driver.open(&db);
        let (held, poison) = (key("held"), key("poison"));
        assert!(a.try_acquire(std::slice::from_ref(&held)).await.unwrap()[0]);
        let signals = a.signals();
        driver.server.fail_batches_with(&resource(&poison));
        let e = a.try_acquire(&[poison]).await.unwrap_err();
        assert!(e.is_session_fatal(), "{e:?}");
        assert!(
            matches!(driver_error(&e), Some(MssqlError::LockStateUnknown { .. })),
            "{e:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            driver.server.holder(&resource(&held)),
            None,
            "the connection was dropped"
        );
        assert!(
            signals.is_lost(),
            "dropping a broken connection is signalled"
        );
        assert!(a.verify().await.unwrap_err().is_session_fatal());
    }

    #[tokio::test]
    async fn acquire_takes_the_lock_the_moment_it_is_released() {
        let (driver, db) = setup(KeyList::Json);
        let mut a = driver.open(&db);
        let mut b = driver.open(&db);
        let k = key("handoff");
        assert!(a.try_acquire(std::slice::from_ref(&k)).await.unwrap()[0]);
        let cancel = CancellationToken::new();
        let (got, released_at) = tokio::join!(b.acquire(&k, &cancel), async {
            tokio::time::sleep(Duration::from_millis(1500)).await; // past one slice
            assert!(a.release(&k).await.unwrap());
            std::time::Instant::now()
        });
        assert!(got.unwrap());
        assert!(released_at.elapsed() < Duration::from_millis(200));
        assert!(
            driver.server.batches("acquire") >= 2,
            "waited over more than one slice"
        );
        assert_eq!(b.held(), vec![k]);
    }

    /// The fenced transaction's plumbing (not its T-SQL): begin, statements
    /// and commit run in order on the session's own connection; a dropped
    /// transaction queues its rollback ahead of the next request; a failed
    /// statement makes commit roll back instead; the session keeps its
    /// locks throughout.
    #[tokio::test]
    async fn fenced_transactions_run_on_the_sessions_connection_in_order() {
        let (driver, db) = setup(KeyList::Json);
        let mut a = driver.open(&db);
        let k = key("leader");
        assert!(a.try_acquire(std::slice::from_ref(&k)).await.unwrap()[0]);
        let spid = a.spid();
        let mut tx = a.transaction().await.unwrap();
        assert_eq!(tx.spid(), spid);
        assert_eq!(
            tx.execute("INSERT INTO fx VALUES (@P1)", &[&1i64])
                .await
                .unwrap(),
            1
        );
        tx.commit().await.unwrap();
        assert_eq!(
            driver.server.transaction_log(spid),
            vec!["begin", "INSERT INTO fx VALUES (@P1)", "commit"]
        );

        // Dropped unfinished: the rollback runs before the next request.
        {
            let mut tx = a.transaction().await.unwrap();
            tx.execute("INSERT INTO fx VALUES (2)", &[]).await.unwrap();
        }
        a.verify().await.unwrap();
        assert_eq!(
            driver.server.transaction_log(spid)[3..],
            ["begin", "INSERT INTO fx VALUES (2)", "rollback"]
        );

        // A failed statement: later ones are refused without a round trip,
        // and commit rolls back instead, leaving the session sound.
        let mut tx = a.transaction().await.unwrap();
        let failed = tx.execute("fail here", &[]).await.unwrap_err();
        assert!(!failed.is_session_fatal(), "{failed:?}");
        let refused = tx.execute("INSERT INTO fx VALUES (3)", &[]).await;
        assert!(
            matches!(
                refused.as_ref().map_err(driver_error),
                Err(Some(MssqlError::TransactionAborted { .. }))
            ),
            "{refused:?}"
        );
        let e = tx.commit().await.unwrap_err();
        assert!(
            matches!(
                driver_error(&e),
                Some(MssqlError::TransactionAborted { .. })
            ),
            "{e:?}"
        );
        assert_eq!(
            driver.server.transaction_log(spid)[6..],
            ["begin", "fail here", "rollback"]
        );
        a.verify()
            .await
            .expect("the session and its lock are intact");
        assert_eq!(driver.server.holder(&resource(&k)).map(|h| h.0), Some(spid));
        a.close().await.unwrap();
    }

    /// A killed session cannot commit: once its loss signal fired the
    /// commit is refused without being sent; sent anyway (before the
    /// signal), it fails as a lost connection. Nothing reaches the server's
    /// log as committed.
    #[tokio::test]
    async fn a_killed_session_cannot_commit_its_fenced_transaction() {
        for wait_for_signal in [true, false] {
            let (driver, db) = setup(KeyList::Json);
            let mut a = driver.open(&db);
            let signals = a.signals();
            let spid = a.spid();
            let mut tx = a.transaction().await.unwrap();
            tx.execute("INSERT INTO fx VALUES (1)", &[]).await.unwrap();
            driver.server.kill(spid);
            if wait_for_signal {
                tokio::time::timeout(Duration::from_secs(5), signals.lost().cancelled())
                    .await
                    .expect("the loss signal fires");
            }
            let e = tx.commit().await.unwrap_err();
            assert!(
                matches!(e, Error::SessionLost { .. }),
                "waited {wait_for_signal}: {e:?}"
            );
            assert!(
                !driver
                    .server
                    .transaction_log(spid)
                    .contains(&"commit".to_string()),
                "waited {wait_for_signal}: a commit ran on a killed session"
            );
            assert!(matches!(
                a.transaction().await,
                Err(Error::SessionLost { .. })
            ));
        }
    }
}
