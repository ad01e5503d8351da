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

    /// The suite's patience with this server (default [`Timings::DEFAULT`];
    /// a harness that measured its server's round trip answers
    /// [`Timings::from_round_trip`]). [`settle`](Self::settle) and
    /// [`slack`](Self::slack) read it.
    fn timings(&self) -> Timings {
        Timings::DEFAULT
    }

    /// How long an eventually-true condition (a dropped session's locks
    /// freed in the background, a waiter woken) may take before the suite
    /// calls it broken; also the hang guard of single awaits.
    fn settle(&self) -> Duration {
        self.timings().settle
    }

    /// Slack on top of computed bounds (scenarios: "within two poll
    /// intervals plus the takeover delay").
    fn slack(&self) -> Duration {
        self.timings().slack
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

/// The deadline and messages of a [`Harness::wait_until_waiting`] for a
/// server-backed driver, which reads how many sessions the server shows
/// waiting for a key (on a side connection, e.g. from `pg_locks` or the
/// processlist) until one does:
///
/// ```ignore
/// let poll = WaiterPoll::new(limit, &key, "pg_locks");
/// while !poll.seen(waiters(&mut conn, &key).await).await {}
/// ```
#[derive(Debug)]
pub struct WaiterPoll {
    key: LockKey,
    place: String,
    limit: Duration,
    started: std::time::Instant,
}

impl WaiterPoll {
    /// Starts the clock: a waiter must show up in `place` within `limit`.
    pub fn new(limit: Duration, key: &LockKey, place: impl Into<String>) -> Self {
        Self {
            key: key.clone(),
            place: place.into(),
            limit,
            started: std::time::Instant::now(),
        }
    }

    /// Judges one reading of the waiter count: `true` once it is above
    /// zero; otherwise sleeps 5 ms and answers `false` (read again). Panics
    /// with a clear message when the count cannot be read or `limit` has
    /// passed.
    pub async fn seen<E: fmt::Display>(&self, count: Result<i64, E>) -> bool {
        let (key, place, limit) = (&self.key, &self.place, self.limit);
        match count {
            Err(e) => panic!("reading {place} failed: {e}"),
            Ok(n) if n > 0 => true,
            Ok(_) => {
                assert!(
                    self.started.elapsed() < limit,
                    "no session waits for {key} in {place} after {limit:?}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
                false
            }
        }
    }
}

/// Tries `attempt` (typically: connect and measure the round trip with
/// [`median_round_trip`]) until it succeeds, each try limited to 5 s and
/// tried again 200 ms after a failure, for a server that may still be
/// starting (a reused container, or one restarting after its setup).
/// After `limit` the last failure is the answer.
///
/// # Errors
///
/// The last try's error (or `timed out`) once `limit` has passed.
pub async fn until_ready<T, E: fmt::Display>(
    limit: Duration,
    mut attempt: impl AsyncFnMut() -> Result<T, E>,
) -> Result<T, String> {
    let started = std::time::Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), attempt()).await {
            Ok(Ok(ready)) => return Ok(ready),
            Ok(Err(e)) if started.elapsed() > limit => return Err(e.to_string()),
            Err(_) if started.elapsed() > limit => return Err("timed out".into()),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The median of five timed `ping`s (e.g. `SELECT 1` on one connection):
/// the round trip [`Timings::from_round_trip`] derives a harness's
/// patience from.
///
/// # Errors
///
/// The first failed ping's error.
pub async fn median_round_trip<E>(
    mut ping: impl AsyncFnMut() -> Result<(), E>,
) -> Result<Duration, E> {
    let mut times = Vec::with_capacity(5);
    for _ in 0..5 {
        let sent = std::time::Instant::now();
        ping().await?;
        times.push(sent.elapsed());
    }
    times.sort_unstable();
    Ok(times[2])
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

/// Implements [`Harness`] for a wrapper by forwarding every method to its
/// field holding the driver's own harness: the projection harnesses of the
/// server drivers add a checkpoint store (and `kill_node`) to the harness
/// their contract suite uses, and need nothing else from it.
///
/// ```ignore
/// struct PgProjectionHarness { inner: common::PgHarness, checkpoints: PgCheckpoints }
/// shardlock_contract_tests::forward_harness!(PgProjectionHarness => inner: common::PgHarness);
/// ```
#[macro_export]
macro_rules! forward_harness {
    ($wrapper:ty => $field:ident : $inner:ty) => {
        impl $crate::Harness for $wrapper {
            type Driver = <$inner as $crate::Harness>::Driver;

            fn driver(&self) -> Self::Driver {
                $crate::Harness::driver(&self.$field)
            }

            fn database(&self) -> $crate::__core::DatabaseId {
                $crate::Harness::database(&self.$field)
            }

            fn terminate(
                &self,
                session: &$crate::SessionOf<Self>,
            ) -> impl ::std::future::Future<Output = ()> + Send {
                $crate::Harness::terminate(&self.$field, session)
            }

            fn spawn_holder(
                &self,
                keys: ::std::vec::Vec<$crate::__core::LockKey>,
            ) -> impl ::std::future::Future<
                Output = ::std::result::Result<$crate::Holder, $crate::__core::BoxError>,
            > + Send {
                $crate::Harness::spawn_holder(&self.$field, keys)
            }

            fn round_trips(&self, session: &$crate::SessionOf<Self>) -> Option<u64> {
                $crate::Harness::round_trips(&self.$field, session)
            }

            fn wait_until_waiting(
                &self,
                key: &$crate::__core::LockKey,
            ) -> impl ::std::future::Future<Output = bool> + Send {
                $crate::Harness::wait_until_waiting(&self.$field, key)
            }

            fn unreachable_driver(&self) -> Option<Self::Driver> {
                $crate::Harness::unreachable_driver(&self.$field)
            }

            fn timings(&self) -> $crate::Timings {
                $crate::Harness::timings(&self.$field)
            }

            fn loss_bound_factor(&self) -> f64 {
                $crate::Harness::loss_bound_factor(&self.$field)
            }
        }
    };
}
