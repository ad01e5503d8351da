//! What a driver provides to run the suite.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use shardlock_core::{BoxError, DatabaseId, Driver, LockKey};

/// The session type of a harness's driver.
pub type SessionOf<H> = <<H as Harness>::Driver as Driver>::Session;

/// How long the default [`Harness::wait_until_waiting`] sleeps before the
/// suite acts on a waiter it cannot see (the waiter has most likely reached
/// the database by then, but nothing proves it).
pub const UNOBSERVED_WAIT: Duration = Duration::from_millis(200);

/// The suite's patience, per harness: see [`Harness::settle`] and
/// [`Harness::slack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// How long an eventually-true condition may take.
    pub settle: Duration,
    /// Slack on top of a computed timing bound.
    pub slack: Duration,
}

impl Timings {
    /// For an in-process driver or a server on this host: 10 s to settle,
    /// 3 s of slack.
    pub const DEFAULT: Self = Self {
        settle: Duration::from_secs(10),
        slack: Duration::from_secs(3),
    };

    /// Derived from a measured round trip to the server: the defaults plus
    /// 200 round trips to settle and 50 of slack, so a distant server (50 ms
    /// away: 20 s and 5.5 s) gets the patience a local one (0.2 ms: about
    /// the defaults) does not need.
    pub fn from_round_trip(round_trip: Duration) -> Self {
        Self {
            settle: Self::DEFAULT.settle + round_trip * 200,
            slack: Self::DEFAULT.slack + round_trip * 50,
        }
    }
}

impl Default for Timings {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// How the suite reaches a driver's server.
///
/// Only the first four methods are required; the others have defaults that
/// make the suite check less (each clause says so loudly, with a line
/// starting `NOT COUNTED` or `NOT SEEN`), so a harness should implement
/// every hook its server can answer.
pub trait Harness: Send + Sync + 'static {
    /// The driver under test.
    type Driver: Driver;

    /// A driver as one node would have it. Every call stands for a separate
    /// node (process): faults injected through one must not affect another.
    fn driver(&self) -> Self::Driver;

    /// The database the suite's keys live in.
    fn database(&self) -> DatabaseId;

    /// Ends `session` from the server's side, as an operator would (e.g.
    /// `pg_terminate_backend`): the server frees its locks at once.
    fn terminate(&self, session: &SessionOf<Self>) -> impl Future<Output = ()> + Send;

    /// Starts a holder of `keys` in a separate process (or what stands for
    /// one in this driver) and returns once it holds them all.
    fn spawn_holder(
        &self,
        keys: Vec<LockKey>,
    ) -> impl Future<Output = Result<Holder, BoxError>> + Send;

    /// A counter of the round trips `session` made to its server, read from
    /// the driver or the server (e.g. `PgSession::round_trips`, or the
    /// memory server's total when nothing else runs on it). The suite only
    /// compares two readings around one call. `None` (the default): the
    /// harness cannot count, and clause 3 says `NOT COUNTED`.
    fn round_trips(&self, session: &SessionOf<Self>) -> Option<u64> {
        let _ = session;
        None
    }

    /// Waits until some session waits in the server for `key` (a blocked
    /// `acquire`), so a clause cancels a wait that really started. Answers
    /// `true` once seen; a harness that can look must **panic** with a clear
    /// message when no waiter shows up within [`settle`](Self::settle).
    /// The default cannot look: it sleeps [`UNOBSERVED_WAIT`] and answers
    /// `false`, and the clause says `NOT SEEN`.
    fn wait_until_waiting(&self, key: &LockKey) -> impl Future<Output = bool> + Send {
        let _ = key;
        async {
            tokio::time::sleep(UNOBSERVED_WAIT).await;
            false
        }
    }

    /// A driver whose server cannot be reached (e.g. options pointing at a
    /// closed port on 127.0.0.1), for clause 10's connect failure. `None`
    /// (the default): the clause says `NOT CHECKED`.
    fn unreachable_driver(&self) -> Option<Self::Driver> {
        None
    }

    /// How long an eventually-true condition (a dropped session's locks
    /// freed in the background, a waiter woken) may take before the suite
    /// calls it broken; also the hang guard of single awaits.
    fn settle(&self) -> Duration {
        Timings::DEFAULT.settle
    }

    /// Slack on top of computed bounds (scenarios: "within two poll
    /// intervals plus the takeover delay").
    fn slack(&self) -> Duration {
        Timings::DEFAULT.slack
    }

    /// The factor on the driver's stated
    /// [`loss_detection_bound`](shardlock_core::Capabilities::loss_detection_bound)
    /// within which clause 8 wants the loss signal (default 2: the bound is
    /// a promise, the factor absorbs a loaded test machine).
    fn loss_bound_factor(&self) -> f64 {
        2.0
    }
}

/// A process holding keys, to be killed hard.
pub struct Holder {
    label: String,
    kill: Box<dyn FnOnce() + Send>,
}

impl Holder {
    /// A holder that `kill` ends hard (SIGKILL or the driver's equivalent).
    pub fn new(label: impl Into<String>, kill: impl FnOnce() + Send + 'static) -> Self {
        Self {
            label: label.into(),
            kill: Box::new(kill),
        }
    }

    /// Kills the holder without letting it clean up.
    pub fn kill(self) {
        (self.kill)();
    }
}

impl fmt::Debug for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Holder")
            .field("label", &self.label)
            .finish()
    }
}

/// A [`Harness::wait_until_waiting`] for a driver that can count the
/// waiters of a key itself (e.g. the memory server, or the SQLite driver
/// for its own process): polls `count` every 2 ms until it is above zero and
/// answers `true`, or panics naming `server` after `limit`.
pub async fn until_waiting(
    limit: Duration,
    key: &LockKey,
    server: &str,
    mut count: impl FnMut() -> usize,
) -> bool {
    let started = std::time::Instant::now();
    while count() == 0 {
        assert!(
            started.elapsed() < limit,
            "no session waits for {key} on {server} after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}

/// A loopback port nobody listens on (bound, then closed), for
/// [`Harness::unreachable_driver`]; `None` when no port can be bound.
pub fn closed_port() -> Option<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
    listener.local_addr().ok().map(|a| a.port())
}

/// A fresh name, unique per call: `<what>-<random>`.
pub fn unique_name(what: &str) -> String {
    let suffix: String = (0..10).map(|_| fastrand::alphanumeric()).collect();
    format!("contract-{what}-{suffix}")
}

/// `n` fresh keys for one test.
pub fn unique_keys(what: &str, n: usize) -> Vec<LockKey> {
    let base = unique_name(what);
    (0..n)
        .map(|i| LockKey::new(format!("{base}-{i}")).expect("BUG: generated names are valid"))
        .collect()
}

/// Prints the loud skip line for a test whose server is not available.
///
/// `env` names the variable that makes it run.
pub fn skip(test_group: &str, why: &str, env: &str) {
    eprintln!("SKIPPED: {test_group}: {why}, set {env} to run");
    if std::env::var("SHARDLOCK_REQUIRE")
        .map(|v| v.split(',').any(|d| test_group.contains(d.trim())))
        .unwrap_or(false)
    {
        panic!("{test_group} is required (SHARDLOCK_REQUIRE) but skipped: {why}");
    }
}

/// Awaits `future` for at most `limit`, or panics saying what did not
/// finish: the suite's hang guard, so a broken driver fails a test with a
/// message instead of hanging it.
pub async fn within<T>(
    limit: Duration,
    what: impl fmt::Display,
    future: impl Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("HANG: {what} did not finish within {limit:?}"),
    }
}
