//! Metrics through the [`metrics`](https://docs.rs/metrics) facade.
//!
//! The library records; the application picks the exporter (Prometheus,
//! OpenTelemetry, StatsD, ...) by installing a `metrics` recorder **before**
//! it starts a coordinator: handles are registered once per database, and a
//! handle registered while no recorder is installed stays a no-op. Without a
//! recorder every call is a no-op, so the cost is a few atomic operations
//! per database and cycle (never one per set).
//!
//! Labels are `node`, `database` and `driver` (plus `cause` on losses);
//! there is never a per-shard or per-key label, to keep cardinality at
//! nodes × databases.
//!
//! | name | kind | labels | what it counts |
//! |---|---|---|---|
//! | `shardlock_sets_owned` | gauge | node, database, driver | sets this node holds (agents running or about to start) |
//! | `shardlock_sets_wanted` | gauge | node, database, driver | sets this node aims to hold: its fair share when the distributor balances, else every set the distributor gives the database |
//! | `shardlock_members_live` | gauge | node, database, driver | live member slots seen by the last balancing probe (balancing only) |
//! | `shardlock_sessions_open` | gauge | node, database, driver | open lock sessions (0 or 1: one connection per database) |
//! | `shardlock_acquisitions_total` | counter | node, database, driver | sets acquired |
//! | `shardlock_denials_total` | counter | node, database, driver | sets asked for and held by another node |
//! | `shardlock_losses_total` | counter | node, database, driver, cause | sessions lost with their sets; `cause` is `verify` (a verify found a key gone), `signal` (the driver's loss signal), `deadline` (a round trip missed the lock-loss timeout), `error` (a round trip failed) |
//! | `shardlock_agent_failures_total` | counter | node, database, driver | agent runs that returned an error or panicked |
//! | `shardlock_agent_restarts_total` | counter | node, database, driver | agents restarted after a failure (after the backoff) |
//! | `shardlock_handoffs_total` | counter | node, database, driver | sets released gracefully (agents stopped first, release announced) |
//! | `shardlock_fenced_writes_total` | counter | projector | checkpoint saves refused because a newer leader claimed (a stale leader stopped) |
//! | `shardlock_projection_events_applied_total` | counter | projector | events a projector applied |
//! | `shardlock_projection_events_dead_lettered_total` | counter | projector | events given to the dead-letter sink after their retries |
//! | `shardlock_cycle_seconds` | histogram | node, driver | duration of one coordinator cycle (verify, releases, acquisition; the agents of won sets are spawned after it) |
//! | `shardlock_verify_seconds` | histogram | node, database, driver | round trip of one `verify` |
//! | `shardlock_batch_size` | histogram | node, database, driver | keys in one batched try-acquire |
//! | `shardlock_loss_to_stopped_seconds` | histogram | node, database, driver | from a session's loss being seen to its sets' agents stopped |
//! | `shardlock_takeover_ownerless_seconds` | histogram | node, database, driver | from a set's grant to its agents' start (the takeover delay actually waited; 0 after a clean handover) |
//!
//! The projection metrics carry the projector's name, not the node's: a
//! projector runs on one leader at a time, and its name is chosen by the
//! application (low cardinality).

use std::collections::HashMap;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Label};

use crate::ids::{DatabaseId, NodeId};

/// Sets this node holds.
pub const SETS_OWNED: &str = "shardlock_sets_owned";
/// Sets this node aims to hold.
pub const SETS_WANTED: &str = "shardlock_sets_wanted";
/// Live member slots seen by the last balancing probe.
pub const MEMBERS_LIVE: &str = "shardlock_members_live";
/// Open lock sessions.
pub const SESSIONS_OPEN: &str = "shardlock_sessions_open";
/// Sets acquired.
pub const ACQUISITIONS: &str = "shardlock_acquisitions_total";
/// Sets denied (held elsewhere).
pub const DENIALS: &str = "shardlock_denials_total";
/// Sessions lost, by cause.
pub const LOSSES: &str = "shardlock_losses_total";
/// Agent runs that failed.
pub const AGENT_FAILURES: &str = "shardlock_agent_failures_total";
/// Agents restarted after a failure.
pub const AGENT_RESTARTS: &str = "shardlock_agent_restarts_total";
/// Sets released gracefully.
pub const HANDOFFS: &str = "shardlock_handoffs_total";
/// Checkpoint saves refused by fencing.
pub const FENCED_WRITES: &str = "shardlock_fenced_writes_total";
/// Events applied by a projector.
pub const EVENTS_APPLIED: &str = "shardlock_projection_events_applied_total";
/// Events dead-lettered by a projector.
pub const EVENTS_DEAD_LETTERED: &str = "shardlock_projection_events_dead_lettered_total";
/// Duration of one coordinator cycle.
pub const CYCLE_SECONDS: &str = "shardlock_cycle_seconds";
/// Round trip of one verify.
pub const VERIFY_SECONDS: &str = "shardlock_verify_seconds";
/// Keys in one batched try-acquire.
pub const BATCH_SIZE: &str = "shardlock_batch_size";
/// From a loss seen to its agents stopped.
pub const LOSS_TO_STOPPED_SECONDS: &str = "shardlock_loss_to_stopped_seconds";
/// From a grant to its agents' start.
pub const TAKEOVER_OWNERLESS_SECONDS: &str = "shardlock_takeover_ownerless_seconds";

/// Every metric name, in the order of the table in the module docs.
pub const ALL: [&str; 18] = [
    SETS_OWNED,
    SETS_WANTED,
    MEMBERS_LIVE,
    SESSIONS_OPEN,
    ACQUISITIONS,
    DENIALS,
    LOSSES,
    AGENT_FAILURES,
    AGENT_RESTARTS,
    HANDOFFS,
    FENCED_WRITES,
    EVENTS_APPLIED,
    EVENTS_DEAD_LETTERED,
    CYCLE_SECONDS,
    VERIFY_SECONDS,
    BATCH_SIZE,
    LOSS_TO_STOPPED_SECONDS,
    TAKEOVER_OWNERLESS_SECONDS,
];

/// Why a session was given up, the `cause` label of [`LOSSES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LossCause {
    /// A verify found a key or the session gone.
    Verify,
    /// The driver's loss signal fired.
    Signal,
    /// A round trip missed the lock-loss timeout.
    Deadline,
    /// A round trip failed (or panicked).
    Error,
}

impl LossCause {
    fn label(self) -> &'static str {
        match self {
            Self::Verify => "verify",
            Self::Signal => "signal",
            Self::Deadline => "deadline",
            Self::Error => "error",
        }
    }
}

/// One database's registered handles.
struct DatabaseMetrics {
    labels: Vec<Label>,
    owned: Gauge,
    wanted: Gauge,
    members: Gauge,
    sessions: Gauge,
    acquisitions: Counter,
    denials: Counter,
    agent_failures: Counter,
    agent_restarts: Counter,
    handoffs: Counter,
    verify: Histogram,
    batch: Histogram,
    loss_to_stopped: Histogram,
    ownerless: Histogram,
}

impl DatabaseMetrics {
    fn new(labels: Vec<Label>) -> Self {
        Self {
            owned: metrics::gauge!(SETS_OWNED, labels.iter()),
            wanted: metrics::gauge!(SETS_WANTED, labels.iter()),
            members: metrics::gauge!(MEMBERS_LIVE, labels.iter()),
            sessions: metrics::gauge!(SESSIONS_OPEN, labels.iter()),
            acquisitions: metrics::counter!(ACQUISITIONS, labels.iter()),
            denials: metrics::counter!(DENIALS, labels.iter()),
            agent_failures: metrics::counter!(AGENT_FAILURES, labels.iter()),
            agent_restarts: metrics::counter!(AGENT_RESTARTS, labels.iter()),
            handoffs: metrics::counter!(HANDOFFS, labels.iter()),
            verify: metrics::histogram!(VERIFY_SECONDS, labels.iter()),
            batch: metrics::histogram!(BATCH_SIZE, labels.iter()),
            loss_to_stopped: metrics::histogram!(LOSS_TO_STOPPED_SECONDS, labels.iter()),
            ownerless: metrics::histogram!(TAKEOVER_OWNERLESS_SECONDS, labels.iter()),
            labels,
        }
    }
}

/// A coordinator's metrics: handles registered once per database, so a
/// cycle costs a few atomic operations per database.
pub(crate) struct CoordinatorMetrics {
    node: String,
    driver: &'static str,
    cycle: Histogram,
    databases: HashMap<DatabaseId, DatabaseMetrics>,
}

impl CoordinatorMetrics {
    pub(crate) fn new(node: &NodeId, driver: &'static str) -> Self {
        let node = node.to_string();
        let cycle = metrics::histogram!(CYCLE_SECONDS, "node" => node.clone(), "driver" => driver);
        Self {
            node,
            driver,
            cycle,
            databases: HashMap::new(),
        }
    }

    fn db(&mut self, database: &DatabaseId) -> &DatabaseMetrics {
        let (node, driver) = (&self.node, self.driver);
        self.databases.entry(database.clone()).or_insert_with(|| {
            DatabaseMetrics::new(vec![
                Label::new("node", node.clone()),
                Label::new("database", database.to_string()),
                Label::new("driver", driver),
            ])
        })
    }

    pub(crate) fn cycle(&self, took: Duration) {
        self.cycle.record(took.as_secs_f64());
    }

    pub(crate) fn owned(&mut self, database: &DatabaseId, sets: usize) {
        self.db(database).owned.set(sets as f64);
    }

    pub(crate) fn wanted(&mut self, database: &DatabaseId, sets: usize) {
        self.db(database).wanted.set(sets as f64);
    }

    pub(crate) fn members(&mut self, database: &DatabaseId, live: usize) {
        self.db(database).members.set(live as f64);
    }

    pub(crate) fn session_open(&mut self, database: &DatabaseId, open: bool) {
        self.db(database).sessions.set(if open { 1.0 } else { 0.0 });
    }

    pub(crate) fn acquired(&mut self, database: &DatabaseId, acquired: usize, denied: usize) {
        let db = self.db(database);
        if acquired > 0 {
            db.acquisitions.increment(acquired as u64);
        }
        if denied > 0 {
            db.denials.increment(denied as u64);
        }
    }

    pub(crate) fn batch(&mut self, database: &DatabaseId, keys: usize) {
        self.db(database).batch.record(keys as f64);
    }

    pub(crate) fn verified(&mut self, database: &DatabaseId, took: Duration) {
        self.db(database).verify.record(took.as_secs_f64());
    }

    pub(crate) fn lost(&mut self, database: &DatabaseId, cause: LossCause) {
        let db = self.db(database);
        let mut labels = db.labels.clone();
        labels.push(Label::new("cause", cause.label()));
        metrics::counter!(LOSSES, labels.iter()).increment(1);
    }

    pub(crate) fn stopped_after_loss(&mut self, database: &DatabaseId, took: Duration) {
        self.db(database).loss_to_stopped.record(took.as_secs_f64());
    }

    pub(crate) fn agent_failed(&mut self, database: &DatabaseId) {
        self.db(database).agent_failures.increment(1);
    }

    pub(crate) fn agent_restarted(&mut self, database: &DatabaseId) {
        self.db(database).agent_restarts.increment(1);
    }

    pub(crate) fn handed_off(&mut self, database: &DatabaseId, sets: usize) {
        if sets > 0 {
            self.db(database).handoffs.increment(sets as u64);
        }
    }

    /// `sets` sets of `database` granted with `took` between their grant
    /// and their agents' start (one handle lookup for a whole batch).
    pub(crate) fn ownerless(&mut self, database: &DatabaseId, took: Duration, sets: usize) {
        if sets > 0 {
            self.db(database)
                .ownerless
                .record_many(took.as_secs_f64(), sets);
        }
    }
}

/// Projection metrics, labelled with the projector's name.
pub(crate) struct ProjectionMetrics {
    applied: Counter,
    dead_lettered: Counter,
    fenced: Counter,
}

impl ProjectionMetrics {
    pub(crate) fn new(projector: &str) -> Self {
        let projector = projector.to_owned();
        Self {
            applied: metrics::counter!(EVENTS_APPLIED, "projector" => projector.clone()),
            dead_lettered: metrics::counter!(EVENTS_DEAD_LETTERED, "projector" => projector.clone()),
            fenced: metrics::counter!(FENCED_WRITES, "projector" => projector),
        }
    }

    pub(crate) fn applied(&self, events: u64) {
        self.applied.increment(events);
    }

    pub(crate) fn dead_lettered(&self) {
        self.dead_lettered.increment(1);
    }

    pub(crate) fn fenced(&self) {
        self.fenced.increment(1);
    }
}
