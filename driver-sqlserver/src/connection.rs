//! Opening the one dedicated TDS connection of a session, and the task that
//! owns it.
//!
//! # Why a task owns the connection
//!
//! A tiberius request that is dropped half-way leaves the connection out of
//! step with the server, and a dropped request that took a lock leaves the
//! lock held without the session knowing. So the connection lives in its own
//! task ([`run`]), which always finishes a request once it started it. The
//! session sends it [`Op`]s over a channel and awaits the answer. Invariants:
//!
//! 1. Requests run one at a time, in the order sent.
//! 2. A request whose answer nobody receives any more (the session's future
//!    was dropped) has its grants undone before the next request runs: locks
//!    granted by a try-acquire or acquire slice travel in a [`Grants`] value
//!    that, unless the session [`accept`](Grants::accept)s it, releases them
//!    (inline if the answer could not be delivered, else by queueing a
//!    compensation request from its `Drop`, which happens before the session
//!    can send anything else).
//! 3. When the session is dropped, the task closes the connection at once,
//!    abandoning any request in flight: the server ends the session and frees
//!    every application lock it owned.
//! 4. After an error that leaves the lock state unknown or the connection
//!    broken, the task drops the connection (freeing the locks on the
//!    server), fires the session's loss signal, and ends; the session
//!    reports itself lost.
//! 5. The task ending for any reason but the session's own close or drop
//!    (e.g. its runtime shutting down) fires the loss signal.
//! 6. Every batch sent counts one round trip
//!    ([`MssqlSession::round_trips`](crate::MssqlSession::round_trips)).
//!
//! The socket beneath tiberius is a [`WatchedStream`]: it fires the loss
//! signal the moment the server ends the connection, between requests too
//! (see [`crate::watch`]).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shardlock_core::{DriverError, ErrorKind, SessionSignals};
use tiberius::{Client, ColumnData, Query, Row, SqlBrowser};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, TokioAsyncWriteCompatExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::{
    classify_login_error, map_get_code, tiberius_connection_lost, MssqlError, UNSUPPORTED_EDITIONS,
};
use crate::options::MssqlOptions;
use crate::sql::{self, Batch, KeyList, Param};
use crate::watch::WatchedStream;

/// A tiberius client on a plain tokio TCP stream, as
/// [`MssqlDriver::connect_client`](crate::MssqlDriver::connect_client) opens
/// it for administrative queries. Lock sessions use a watched stream
/// instead (see the crate docs, "Loss signal").
pub type TdsClient = Client<Compat<TcpStream>>;

/// A lock session's tiberius client: on a [`WatchedStream`].
pub(crate) type SessionClient = Client<Compat<WatchedStream>>;

/// The longest application name the login packet carries (`program_name` is
/// `nvarchar(128)`).
const MAX_APPLICATION_NAME: usize = 128;

/// How long closing a connection gracefully may take before it is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How much longer than one acquire slice tiberius' command timeout must be.
const COMMAND_TIMEOUT_MARGIN: Duration = Duration::from_secs(10);

/// The connection a task drives: tiberius on TCP in production, a simulated
/// server in the crate's unit tests.
pub(crate) trait Wire: Send + 'static {
    /// Runs `batch` and returns the rows of its (only) result set.
    fn run(
        &mut self,
        batch: &Batch,
    ) -> impl Future<Output = Result<Vec<Row>, tiberius::error::Error>> + Send;

    /// Closes the connection gracefully.
    fn close(self) -> impl Future<Output = Result<(), tiberius::error::Error>> + Send;

    /// Runs `sql` as a plain batch (no parameters, not through
    /// `sp_executesql`, so `SET` options and an opened transaction outlive
    /// it), draining its results.
    fn plain(
        &mut self,
        sql: &str,
    ) -> impl Future<Output = Result<(), tiberius::error::Error>> + Send;

    /// Runs one statement of a fenced transaction with its parameters
    /// (`@P1`, ...): the rows of its first result set when `rows`, else the
    /// rows it affected.
    fn statement(
        &mut self,
        sql: &str,
        params: Vec<ColumnData<'static>>,
        rows: bool,
    ) -> impl Future<Output = Result<Statement, tiberius::error::Error>> + Send;
}

/// What a statement of a fenced transaction answered.
#[derive(Debug, Default)]
pub(crate) struct Statement {
    /// The rows of its first result set (for a query).
    pub(crate) rows: Vec<Row>,
    /// The rows it affected (for an `execute`).
    pub(crate) affected: u64,
}

impl<S> Wire for Client<Compat<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn run(&mut self, batch: &Batch) -> Result<Vec<Row>, tiberius::error::Error> {
        let mut query = Query::new(batch.sql.as_str());
        for param in &batch.params {
            match param {
                Param::Text(s) => query.bind(s.as_str()),
                Param::Int(v) => query.bind(*v),
            }
        }
        query.query(self).await?.into_first_result().await
    }

    async fn close(self) -> Result<(), tiberius::error::Error> {
        Client::close(self).await
    }

    async fn plain(&mut self, sql: &str) -> Result<(), tiberius::error::Error> {
        self.simple_query(sql).await?.into_results().await?;
        Ok(())
    }

    async fn statement(
        &mut self,
        sql: &str,
        params: Vec<ColumnData<'static>>,
        rows: bool,
    ) -> Result<Statement, tiberius::error::Error> {
        let mut query = Query::new(sql.to_string());
        for param in params {
            query.bind(param);
        }
        if rows {
            let rows = query.query(self).await?.into_first_result().await?;
            Ok(Statement { rows, affected: 0 })
        } else {
            let affected = query.execute(self).await?.total();
            Ok(Statement {
                rows: Vec::new(),
                affected,
            })
        }
    }
}

/// What the driver learnt about the server and session at connect.
#[derive(Debug, Clone)]
pub(crate) struct ServerInfo {
    /// `@@SPID`: the server's session id.
    pub(crate) spid: i32,
    /// `SERVERPROPERTY('ProductVersion')`, e.g. `16.0.4135.4`.
    pub(crate) product_version: String,
    /// `DB_NAME()`: the database the session is in.
    pub(crate) database: String,
    /// How batches pass lists of names on this connection.
    pub(crate) key_list: KeyList,
}

/// `shardlock:<node>`, cut to the 128 characters the login carries.
pub(crate) fn application_name(node: &str) -> String {
    format!("shardlock:{node}")
        .chars()
        .take(MAX_APPLICATION_NAME)
        .collect()
}

/// Opens a lock session's connection: as [`open_client`], on a
/// [`WatchedStream`]; answers the signals of the stream tiberius kept (after
/// a routing redirect, the second one's).
pub(crate) async fn open_session_client(
    options: &MssqlOptions,
    database: Option<&str>,
    application_name: &str,
) -> Result<(SessionClient, SessionSignals), MssqlError> {
    let mut signals = None;
    let client = open_client(options, database, application_name, |tcp| {
        let stream = WatchedStream::tcp(tcp);
        signals = Some(stream.signals());
        stream
    })
    .await?;
    // `wrap` ran for the stream tiberius kept; the default is unreachable.
    Ok((client, signals.unwrap_or_default()))
}

/// Opens a tiberius connection to the server of `options`, in `database`
/// (or the connection string's), labelled `application_name`, on the TCP
/// stream as `wrap` turns it (the identity for administrative clients, a
/// [`WatchedStream`] for sessions). Both the direct path and the SQL Server
/// Browser path (`connect_named`) go through `wrap`. Follows one routing
/// redirect (Azure SQL's redirect connection policy).
pub(crate) async fn open_client<S, F>(
    options: &MssqlOptions,
    database: Option<&str>,
    application_name: &str,
    mut wrap: F,
) -> Result<Client<Compat<S>>, MssqlError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    F: FnMut(TcpStream) -> S,
{
    let mut config = options.config().clone();
    if let Some(database) = database {
        config.database(database);
    }
    config.application_name(application_name);
    // tiberius fails a request (and the connection) when the server sends
    // nothing for its command timeout (30 s by default); a server-side wait
    // slice sends nothing until it ends, so the timeout must outlast it.
    let slice_floor = options.get_acquire_slice() + COMMAND_TIMEOUT_MARGIN;
    if let Some(timeout) = config.get_command_timeout() {
        if timeout < slice_floor {
            config.command_timeout(Some(slice_floor));
        }
    }
    let addr = config.get_addr();
    // Resolves named instances through SQL Server Browser, honours
    // MultiSubnetFailover, and sets TCP_NODELAY.
    let tcp =
        TcpStream::connect_named(&config)
            .await
            .map_err(|source| MssqlError::Unreachable {
                addr: addr.clone(),
                source,
            })?;
    match Client::connect(config.clone(), wrap(tcp).compat_write()).await {
        Ok(client) => Ok(client),
        Err(tiberius::error::Error::Routing { host, port }) => {
            debug!(from = %addr, to = %format!("{host}:{port}"), "SQL Server routed the login");
            config.host(&host);
            config.port(port);
            let addr = config.get_addr();
            let tcp = TcpStream::connect(&addr)
                .await
                .map_err(|e| MssqlError::Unreachable {
                    addr: addr.clone(),
                    source: e.into(),
                })?;
            tcp.set_nodelay(true).map_err(|e| MssqlError::Unreachable {
                addr: addr.clone(),
                source: e.into(),
            })?;
            Client::connect(config, wrap(tcp).compat_write())
                .await
                .map_err(|e| classify_login_error(&addr, database, e))
        }
        Err(e) => Err(classify_login_error(&addr, database, e)),
    }
}

/// Sets the session options and checks the server (see
/// [`sql::CONNECT_PROBE`]).
pub(crate) async fn probe<S>(client: &mut Client<Compat<S>>) -> Result<ServerInfo, MssqlError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    const OP: &str = "the connect-time check";
    let failed = |source: tiberius::error::Error| {
        if tiberius_connection_lost(&source) {
            MssqlError::ConnectionLost {
                operation: OP,
                source: Some(source),
            }
        } else {
            MssqlError::NotSqlServer {
                detail: "the check of @@VERSION and SERVERPROPERTY failed".to_string(),
                source: Some(source),
            }
        }
    };
    let row = client
        .simple_query(sql::CONNECT_PROBE)
        .await
        .map_err(failed)?
        .into_row()
        .await
        .map_err(failed)?
        .ok_or_else(|| MssqlError::NotSqlServer {
            detail: "the check of @@VERSION and SERVERPROPERTY returned no row".to_string(),
            source: None,
        })?;
    let text = |name: &str| -> Result<Option<String>, MssqlError> {
        row.try_get::<&str, _>(name)
            .map(|v| v.map(str::to_string))
            .map_err(failed)
    };
    let int = |name: &str| -> Result<Option<i32>, MssqlError> {
        row.try_get::<i32, _>(name).map_err(failed)
    };
    let version = text("version")?.unwrap_or_default();
    let edition = int("engine_edition")?;
    check_server(&version, edition).map_err(|detail| MssqlError::NotSqlServer {
        detail,
        source: None,
    })?;
    let spid = int("spid")?.ok_or_else(|| MssqlError::UnexpectedResult {
        operation: OP,
        detail: "@@SPID is NULL".to_string(),
    })?;
    let compatibility_level = int("compatibility_level")?;
    Ok(ServerInfo {
        spid,
        product_version: text("product_version")?.unwrap_or_default(),
        database: text("database_name")?.unwrap_or_default(),
        key_list: KeyList::for_compatibility_level(compatibility_level),
    })
}

/// Accepts SQL Server, Azure SQL Database, Managed Instance and Azure SQL
/// Edge; refuses other TDS servers and the editions without `sp_getapplock`.
pub(crate) fn check_server(version: &str, engine_edition: Option<i32>) -> Result<(), String> {
    let first_line = version.lines().next().unwrap_or_default().trim();
    if !(first_line.starts_with("Microsoft") && first_line.contains("SQL")) {
        return Err(format!(
            "@@VERSION is {first_line:?}, not Microsoft SQL Server"
        ));
    }
    if let Some(edition) = engine_edition {
        if UNSUPPORTED_EDITIONS.contains(&edition) {
            return Err(format!(
                "engine edition {edition} (Azure Synapse) has no sp_getapplock"
            ));
        }
    }
    Ok(())
}

/// The locks granted by one request, to be either accepted by the session or
/// released again (see the module docs, invariant 2).
pub(crate) struct Grants {
    resources: Vec<String>,
    undo: Option<mpsc::WeakUnboundedSender<Request>>,
}

impl Grants {
    /// The session records these locks as held: nothing is undone.
    pub(crate) fn accept(mut self) -> Vec<String> {
        self.undo = None;
        std::mem::take(&mut self.resources)
    }
}

impl Drop for Grants {
    fn drop(&mut self) {
        let Some(undo) = self.undo.take() else { return };
        if self.resources.is_empty() {
            return;
        }
        // The session dropped its future after the answer arrived. Queue the
        // release; it runs before anything the session sends next. If the
        // session is gone too, the connection closes and the server frees
        // the locks.
        if let Some(tx) = undo.upgrade() {
            let resources = std::mem::take(&mut self.resources);
            warn!(
                count = resources.len(),
                "a lock request was abandoned after it was granted: releasing"
            );
            let _ = tx.send(Request::Compensate { resources });
        }
    }
}

impl std::fmt::Debug for Grants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grants")
            .field("resources", &self.resources.len())
            .field("armed", &self.undo.is_some())
            .finish()
    }
}

/// A request of the session.
#[derive(Debug)]
pub(crate) enum Op {
    /// `sp_getapplock` without waiting on each resource, in one batch.
    TryAcquire(Vec<String>),
    /// One server-side wait of at most `timeout_ms` for `resource`.
    AcquireSlice {
        /// The resource.
        resource: String,
        /// `@LockTimeout`.
        timeout_ms: i32,
    },
    /// `sp_releaseapplock` on each resource held, in one batch.
    Release(Vec<String>),
    /// `APPLOCK_MODE` of each resource, in one batch.
    Verify(Vec<String>),
    /// Release these, then close the connection.
    Close(Vec<String>),
    /// Opens a fenced transaction ([`sql::BEGIN_FENCED`]).
    Begin,
    /// One statement inside the fenced transaction.
    Statement {
        /// The T-SQL text, parameters as `@P1`, ...
        sql: String,
        /// The parameters, owned.
        params: Vec<ColumnData<'static>>,
        /// Whether the caller wants rows (a query) or a count (an execute).
        rows: bool,
    },
    /// Commits the fenced transaction ([`sql::COMMIT_FENCED`]).
    Commit,
    /// Rolls the fenced transaction back, if one is open
    /// ([`sql::ROLLBACK_FENCED`]).
    Rollback,
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Self::TryAcquire(_) => "try_acquire",
            Self::AcquireSlice { .. } => "acquire",
            Self::Release(_) => "release",
            Self::Verify(_) => "verify",
            Self::Close(_) => "close",
            Self::Begin => "begin a fenced transaction",
            Self::Statement { .. } => "a statement of a fenced transaction",
            Self::Commit => "commit a fenced transaction",
            Self::Rollback => "roll back a fenced transaction",
        }
    }
}

/// The answer to an [`Op`].
#[derive(Debug)]
pub(crate) enum Reply {
    /// Return codes of `sp_getapplock`, one per resource in order, and the
    /// locks they granted.
    Acquired {
        /// The codes.
        codes: Vec<i32>,
        /// The granted locks.
        grants: Grants,
    },
    /// Codes of the release batch, one per resource in order.
    Released(Vec<i32>),
    /// The session id the server reported and the lock mode of each
    /// resource, in order.
    Verified {
        /// `@@SPID` as seen by the batch.
        spid: i32,
        /// `APPLOCK_MODE` per resource.
        modes: Vec<String>,
    },
    /// The connection is closed.
    Closed,
    /// A transaction batch ran (begin, commit, rollback).
    Done,
    /// A statement of a fenced transaction ran.
    Statement(Statement),
}

type Answer = Result<Reply, MssqlError>;

/// A message to the connection task.
#[derive(Debug)]
pub(crate) enum Request {
    /// Run an operation and answer it.
    Op(Op, oneshot::Sender<Answer>),
    /// Release locks whose grant nobody received.
    Compensate {
        /// The resources.
        resources: Vec<String>,
    },
}

/// The session's handle on its connection task.
#[derive(Debug)]
pub(crate) struct Connection {
    tx: mpsc::UnboundedSender<Request>,
    shutdown: CancellationToken,
    info: ServerInfo,
    signals: SessionSignals,
    round_trips: Arc<AtomicU64>,
}

impl Connection {
    /// Starts the task owning `client` on the current tokio runtime;
    /// `signals` are the ones the client's stream fires, and the task fires
    /// them too when it drops the connection.
    pub(crate) fn spawn(client: impl Wire, info: ServerInfo, signals: SessionSignals) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let round_trips = Arc::new(AtomicU64::new(0));
        let task = Task {
            key_list: info.key_list,
            spid: info.spid,
            undo: tx.downgrade(),
            round_trips: Arc::clone(&round_trips),
        };
        let watchdog = Watchdog {
            signals: signals.clone(),
            armed: true,
        };
        tokio::spawn(task.run(client, rx, shutdown.clone(), watchdog));
        Self {
            tx,
            shutdown,
            info,
            signals,
            round_trips,
        }
    }

    /// What the driver learnt at connect.
    pub(crate) fn info(&self) -> &ServerInfo {
        &self.info
    }

    /// The connection's loss signals.
    pub(crate) fn signals(&self) -> SessionSignals {
        self.signals.clone()
    }

    /// Batches sent so far (one round trip each).
    pub(crate) fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// Sends `op` and waits for its answer.
    ///
    /// Dropping the returned future abandons the answer, never the request:
    /// the task finishes it and undoes its grants.
    pub(crate) async fn call(&self, op: Op) -> Answer {
        let operation = op.name();
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Request::Op(op, reply)).is_err() {
            return Err(MssqlError::ConnectionLost {
                operation,
                source: None,
            });
        }
        answer.await.unwrap_or(Err(MssqlError::ConnectionLost {
            operation,
            source: None,
        }))
    }

    /// Queues `op` without waiting for its answer: it runs before anything
    /// sent later (the rollback of a fenced transaction dropped unfinished).
    /// A failure that breaks the connection still fires the loss signal.
    pub(crate) fn send_detached(&self, op: Op) {
        let (reply, _answer) = oneshot::channel();
        // A closed task has closed the connection: the server rolled back.
        let _ = self.tx.send(Request::Op(op, reply));
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Never blocks: the task sees this and drops the connection.
        self.shutdown.cancel();
    }
}

/// What the task does after a request.
enum Flow {
    Continue,
    Close,
    /// The connection is gone or its locks unknown: drop it, for this reason.
    Broken(String),
}

/// Fires the loss signal if the task ends without the session asking (e.g.
/// its runtime shut down and dropped it).
struct Watchdog {
    signals: SessionSignals,
    armed: bool,
}

impl Watchdog {
    /// The session closed or dropped its connection: not a loss.
    fn disarm(&mut self) {
        self.armed = false;
    }

    /// The task drops the connection on its own: a loss.
    fn fire(&mut self, reason: String) {
        self.armed = false;
        self.signals.fire_lost(reason);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if self.armed {
            self.signals
                .fire_lost("the connection task stopped (its tokio runtime shut down)");
        }
    }
}

/// The connection task's state besides the client.
struct Task {
    key_list: KeyList,
    spid: i32,
    undo: mpsc::WeakUnboundedSender<Request>,
    round_trips: Arc<AtomicU64>,
}

impl Task {
    async fn run<W: Wire>(
        self,
        mut client: W,
        mut rx: mpsc::UnboundedReceiver<Request>,
        shutdown: CancellationToken,
        mut watchdog: Watchdog,
    ) {
        loop {
            let request = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                request = rx.recv() => match request {
                    Some(request) => request,
                    None => break,
                },
            };
            let flow = tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    debug!(spid = self.spid, "session dropped during a request: closing its connection");
                    // Dropping the client closes the socket; the server ends
                    // the session and frees its locks.
                    watchdog.disarm();
                    return;
                }
                flow = self.serve(&mut client, request) => flow,
            };
            match flow {
                Flow::Continue => {}
                Flow::Close => break,
                Flow::Broken(reason) => {
                    debug!(
                        spid = self.spid,
                        %reason,
                        "connection broken or lock state unknown: dropping it"
                    );
                    drop(client);
                    watchdog.fire(reason);
                    return;
                }
            }
        }
        watchdog.disarm();
        // The session was closed or dropped: close the connection; the
        // server ends the session and frees its locks.
        match tokio::time::timeout(CLOSE_TIMEOUT, Wire::close(client)).await {
            Ok(Ok(())) => debug!(spid = self.spid, "connection closed"),
            Ok(Err(e)) => debug!(spid = self.spid, error = %e, "closing the connection failed"),
            Err(_) => debug!(
                spid = self.spid,
                "closing the connection timed out; dropped"
            ),
        }
    }

    async fn serve<W: Wire>(&self, client: &mut W, request: Request) -> Flow {
        match request {
            Request::Compensate { resources } => self.compensate(client, resources).await,
            Request::Op(op, reply) => {
                let closing = matches!(op, Op::Close(_));
                let answer = self.run_op(client, op).await;
                let broken = match &answer {
                    Err(e) if e.kind() == ErrorKind::SessionFatal => Some(e.to_string()),
                    _ => None,
                };
                if let Err(Ok(Reply::Acquired { grants, .. })) = reply.send(answer) {
                    // Nobody waits for this answer any more: undo its grants
                    // now, before the next request.
                    let resources = grants.accept();
                    if !resources.is_empty() {
                        warn!(
                            spid = self.spid,
                            count = resources.len(),
                            "a lock request was abandoned while running: releasing what it got"
                        );
                        return self.compensate(client, resources).await;
                    }
                }
                if let Some(reason) = broken {
                    Flow::Broken(reason)
                } else if closing {
                    Flow::Close
                } else {
                    Flow::Continue
                }
            }
        }
    }

    async fn compensate<W: Wire>(&self, client: &mut W, resources: Vec<String>) -> Flow {
        match self
            .release(client, &resources, "release of abandoned grants")
            .await
        {
            Ok(_) => Flow::Continue,
            Err(e) => {
                warn!(spid = self.spid, error = %e, "releasing abandoned grants failed: dropping the connection");
                // Unknown state: dropping the connection frees every lock.
                Flow::Broken(format!(
                    "releasing the grants of an abandoned request failed ({e}); the connection was dropped"
                ))
            }
        }
    }

    async fn run_op<W: Wire>(&self, client: &mut W, op: Op) -> Answer {
        match op {
            Op::TryAcquire(resources) => {
                let mut codes = Vec::with_capacity(resources.len());
                let mut granted = Vec::new();
                for batch in sql::try_acquire(self.key_list, &resources) {
                    let start = codes.len();
                    // A failure is session-fatal: the connection is dropped,
                    // which frees what earlier chunks granted.
                    let rows = self.run_batch(client, &batch, "try_acquire", true).await?;
                    let chunk = indexed_ints(&rows, "r", batch.names, "try_acquire")?;
                    for (offset, code) in chunk.iter().enumerate() {
                        if map_get_code(*code) == Ok(true) {
                            granted.push(resources[start + offset].clone());
                        }
                    }
                    codes.extend(chunk);
                }
                Ok(Reply::Acquired {
                    codes,
                    grants: self.grants(granted),
                })
            }
            Op::AcquireSlice {
                resource,
                timeout_ms,
            } => {
                let batch = sql::acquire_slice(&resource, timeout_ms);
                let rows = self.run_batch(client, &batch, "acquire", true).await?;
                let code = single_int(&rows, "r", "acquire")?;
                let granted = if map_get_code(code) == Ok(true) {
                    vec![resource]
                } else {
                    Vec::new()
                };
                Ok(Reply::Acquired {
                    codes: vec![code],
                    grants: self.grants(granted),
                })
            }
            Op::Release(resources) => self
                .release(client, &resources, "release")
                .await
                .map(Reply::Released),
            Op::Verify(resources) => self.verify(client, &resources).await,
            Op::Close(resources) => {
                if !resources.is_empty() {
                    if let Err(e) = self.release(client, &resources, "close").await {
                        // Closing the connection frees them anyway.
                        debug!(spid = self.spid, error = %e, "release before close failed");
                    }
                }
                Ok(Reply::Closed)
            }
            Op::Begin => {
                self.control(client, sql::BEGIN_FENCED, "begin a fenced transaction")
                    .await
            }
            Op::Commit => {
                self.control(client, sql::COMMIT_FENCED, "commit a fenced transaction")
                    .await
            }
            Op::Rollback => {
                self.control(
                    client,
                    sql::ROLLBACK_FENCED,
                    "roll back a fenced transaction",
                )
                .await
            }
            Op::Statement { sql, params, rows } => {
                const OP: &str = "a statement of a fenced transaction";
                self.round_trips.fetch_add(1, Ordering::Relaxed);
                client
                    .statement(&sql, params, rows)
                    .await
                    .map(Reply::Statement)
                    .map_err(|e| MssqlError::from_query(OP, e))
            }
        }
    }

    /// Runs a fenced transaction's control batch (no parameters, no user
    /// data). A failure is a query error unless the connection is gone.
    async fn control<W: Wire>(&self, client: &mut W, sql: &str, operation: &'static str) -> Answer {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        client
            .plain(sql)
            .await
            .map(|()| Reply::Done)
            .map_err(|e| MssqlError::from_query(operation, e))
    }

    /// Runs one batch (one round trip) and classifies its failure.
    async fn run_batch<W: Wire>(
        &self,
        client: &mut W,
        batch: &Batch,
        operation: &'static str,
        changes_locks: bool,
    ) -> Result<Vec<Row>, MssqlError> {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        client.run(batch).await.map_err(|e| {
            if changes_locks {
                MssqlError::from_lock_batch(operation, e)
            } else {
                MssqlError::from_query(operation, e)
            }
        })
    }

    fn grants(&self, resources: Vec<String>) -> Grants {
        Grants {
            resources,
            undo: Some(self.undo.clone()),
        }
    }

    async fn release<W: Wire>(
        &self,
        client: &mut W,
        resources: &[String],
        operation: &'static str,
    ) -> Result<Vec<i32>, MssqlError> {
        let mut codes = Vec::with_capacity(resources.len());
        for batch in sql::release(self.key_list, resources) {
            let rows = self.run_batch(client, &batch, operation, true).await?;
            codes.extend(indexed_ints(&rows, "r", batch.names, operation)?);
        }
        Ok(codes)
    }

    async fn verify<W: Wire>(&self, client: &mut W, resources: &[String]) -> Answer {
        const OP: &str = "verify";
        if resources.is_empty() {
            let rows = self.run_batch(client, &plain(sql::PING), OP, false).await?;
            let spid = single_int(&rows, "spid", OP)?;
            return Ok(Reply::Verified {
                spid,
                modes: Vec::new(),
            });
        }
        let mut spid = self.spid;
        let mut modes = Vec::with_capacity(resources.len());
        for batch in sql::verify(self.key_list, resources) {
            let rows = self.run_batch(client, &batch, OP, false).await?;
            if rows.len() != batch.names {
                return Err(unexpected(
                    OP,
                    format!("{} rows for {} names", rows.len(), batch.names),
                ));
            }
            for (i, row) in rows.iter().enumerate() {
                check_index(row, i, OP)?;
                spid = get_int(row, "spid", OP)?;
                let mode: Option<&str> = row
                    .try_get("mode")
                    .map_err(|e| MssqlError::from_query(OP, e))?;
                modes.push(mode.unwrap_or("NoLock").to_string());
            }
        }
        Ok(Reply::Verified { spid, modes })
    }
}

fn plain(sql: &str) -> Batch {
    Batch {
        sql: sql.to_string(),
        params: Vec::new(),
        names: 0,
    }
}

fn unexpected(operation: &'static str, detail: String) -> MssqlError {
    MssqlError::UnexpectedResult { operation, detail }
}

fn get_int(row: &Row, column: &str, operation: &'static str) -> Result<i32, MssqlError> {
    row.try_get::<i32, _>(column)
        .map_err(|e| MssqlError::from_query(operation, e))?
        .ok_or_else(|| unexpected(operation, format!("{column} is NULL")))
}

fn check_index(row: &Row, expected: usize, operation: &'static str) -> Result<(), MssqlError> {
    let i = get_int(row, "i", operation)?;
    if usize::try_from(i).ok() == Some(expected) {
        Ok(())
    } else {
        Err(unexpected(
            operation,
            format!("row {expected} has index {i}"),
        ))
    }
}

/// The `column` of rows `(i, column)` numbered 0..count in order.
fn indexed_ints(
    rows: &[Row],
    column: &str,
    count: usize,
    operation: &'static str,
) -> Result<Vec<i32>, MssqlError> {
    if rows.len() != count {
        return Err(unexpected(
            operation,
            format!("{} rows for {count} names", rows.len()),
        ));
    }
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            check_index(row, i, operation)?;
            get_int(row, column, operation)
        })
        .collect()
}

fn single_int(rows: &[Row], column: &str, operation: &'static str) -> Result<i32, MssqlError> {
    match rows {
        [row] => get_int(row, column, operation),
        _ => Err(unexpected(
            operation,
            format!("{} rows, expected 1", rows.len()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_name_is_prefixed_and_bounded() {
        assert_eq!(application_name("web-1-42-abcd"), "shardlock:web-1-42-abcd");
        let long = application_name(&"é".repeat(300));
        assert_eq!(long.chars().count(), MAX_APPLICATION_NAME);
        assert!(long.starts_with("shardlock:é"));
    }

    #[test]
    fn only_sql_server_is_accepted() {
        let sql_server = "Microsoft SQL Server 2022 (RTM-CU14) (KB5038325) - 16.0.4135.4 (X64)\n\tJul 10 2024 14:09:09\n\tCopyright (C) 2022 Microsoft Corporation\n\tDeveloper Edition (64-bit) on Linux (Ubuntu 22.04.4 LTS) <X64>";
        assert_eq!(check_server(sql_server, Some(3)), Ok(()));
        assert_eq!(
            check_server("Microsoft SQL Azure (RTM) - 12.0.2000.8", Some(5)),
            Ok(())
        );
        assert_eq!(
            check_server(
                "Microsoft Azure SQL Edge Developer (RTM) - 15.0.2000.1552",
                Some(9)
            ),
            Ok(())
        );
        assert_eq!(check_server(sql_server, None), Ok(()));
        for other in [
            "Babelfish for Aurora PostgreSQL with SQL Server Compatibility - 12.0.2000.8",
            "Adaptive Server Enterprise/16.0",
            "",
        ] {
            let e = check_server(other, Some(3)).unwrap_err();
            assert!(e.contains("not Microsoft SQL Server"), "{e}");
        }
        let e =
            check_server("Microsoft Azure SQL Data Warehouse - 10.0.15665.0", Some(6)).unwrap_err();
        assert!(e.contains("Synapse"), "{e}");
        assert!(check_server("Microsoft SQL Azure (RTM) - 12.0", Some(11)).is_err());
    }

    #[tokio::test]
    async fn an_unaccepted_grant_queues_its_release() {
        let (tx, mut rx) = mpsc::unbounded_channel::<Request>();
        let grants = Grants {
            resources: vec!["shardlock:v1:a".to_string()],
            undo: Some(tx.downgrade()),
        };
        drop(grants);
        match rx.try_recv() {
            Ok(Request::Compensate { resources }) => assert_eq!(resources, vec!["shardlock:v1:a"]),
            other => panic!("expected a compensation, got {other:?}"),
        }
        // Accepted grants queue nothing.
        let grants = Grants {
            resources: vec!["shardlock:v1:b".to_string()],
            undo: Some(tx.downgrade()),
        };
        assert_eq!(grants.accept(), vec!["shardlock:v1:b"]);
        assert!(rx.try_recv().is_err());
        // Dropped inside an undelivered oneshot answer: still released.
        let (reply, answer) = oneshot::channel::<Answer>();
        let grants = Grants {
            resources: vec!["shardlock:v1:c".to_string()],
            undo: Some(tx.downgrade()),
        };
        reply
            .send(Ok(Reply::Acquired {
                codes: vec![0],
                grants,
            }))
            .expect("receiver alive");
        drop(answer);
        match rx.try_recv() {
            Ok(Request::Compensate { resources }) => assert_eq!(resources, vec!["shardlock:v1:c"]),
            other => panic!("expected a compensation, got {other:?}"),
        }
        // With the session gone (no strong sender), nothing is sent.
        let weak = tx.downgrade();
        drop(tx);
        drop(Grants {
            resources: vec!["shardlock:v1:d".to_string()],
            undo: Some(weak),
        });
        assert!(rx.try_recv().is_err());
    }
}
