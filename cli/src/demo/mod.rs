//! `shardlock demo`: nodes sharing shards through their locks, balanced by
//! default. A script of four phases, each played once the previous one has
//! settled: start the nodes (3 nodes, 12 shards: 4/4/4), kill -9 one (6/6),
//! stop another gracefully (12 on the last), start a new node (6/6). A live
//! table, and a summary with the counts of each phase, the rebalance times
//! and `overlaps: N`.

mod memory;
mod processes;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};

/// Which driver the demo runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DemoDriver {
    /// Real `shardlock node` processes sharing a lock directory: one is
    /// killed with SIGKILL, one stopped gracefully, one started mid-run.
    Sqlite,
    /// Every node inside this process on the in-memory driver: one crashes
    /// (its coordinator aborted, as by kill -9; or, with `--sever`, its
    /// network is cut for good), one is stopped gracefully, one started
    /// mid-run.
    Memory,
    /// Real `shardlock node` processes on PostgreSQL advisory locks
    /// (`--url`): one killed with SIGKILL, one stopped gracefully, one
    /// started mid-run.
    Postgres,
    /// Real `shardlock node` processes on MySQL/MariaDB `GET_LOCK` named
    /// locks (`--url mysql://...`): one killed with SIGKILL, one stopped
    /// gracefully, one started mid-run.
    Mysql,
}

/// How the demo's nodes share the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DemoDistributor {
    /// Each node takes its fair share (ceil(shards / live nodes)) and gives
    /// back any surplus when a node joins.
    Balanced,
    /// No balancing, for comparison: the first node to cycle takes every
    /// free shard, the others stand by.
    SingleTenant,
}

/// Options of `shardlock demo`.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Driver to coordinate through.
    #[arg(long, value_enum, default_value = "sqlite")]
    pub(crate) driver: DemoDriver,
    /// How the nodes share the shards.
    #[arg(long, value_enum, default_value = "balanced")]
    pub(crate) distributor: DemoDistributor,
    /// Number of nodes started first (at least 3: one is killed, one
    /// stopped, and a new one joins later).
    #[arg(long, default_value_t = 3)]
    pub(crate) nodes: usize,
    /// Number of shards.
    #[arg(long, default_value_t = 12)]
    pub(crate) shards: usize,
    /// The longest the demo may run, in seconds (a hang guard): it ends as
    /// soon as its four phases have played, about 10 s.
    #[arg(long, default_value_t = 60)]
    pub(crate) duration: u64,
    /// Memory driver: the crash is a network sever that never heals instead
    /// of an abort, to show self-fencing (the cut-off node stops its work
    /// before the lock server frees its locks, 2 s later).
    #[arg(long)]
    pub(crate) sever: bool,
    /// Print events line by line instead of redrawing a table (default when
    /// the output is not a terminal).
    #[arg(long)]
    pub(crate) plain: bool,
    /// Server URL for `--driver postgres` or `--driver mysql`.
    #[arg(long)]
    pub(crate) url: Option<String>,
    /// Keep the demo's working directory (node logs, records, lock
    /// directory) instead of deleting it at the end.
    #[arg(long)]
    pub(crate) keep: bool,
}

pub(crate) async fn run(args: DemoArgs) -> Result<ExitCode> {
    if args.nodes < 3 || args.nodes > 32 {
        bail!("--nodes must be between 3 and 32 (one is killed, one stopped, one takes over)");
    }
    if args.shards == 0 || args.shards > 10_000 {
        bail!("--shards must be between 1 and 10000");
    }
    if args.duration < 6 {
        bail!("--duration must be at least 6 seconds (each phase is held {HOLD:?} once settled)");
    }
    if args.sever && args.driver != DemoDriver::Memory {
        bail!("--sever needs --driver memory (the process demos kill a node with SIGKILL)");
    }
    match args.driver {
        DemoDriver::Memory => memory::run(&args).await,
        DemoDriver::Sqlite => processes::run(&args, None).await,
        DemoDriver::Postgres => match &args.url {
            Some(url) => processes::run(&args, Some(("postgres", url))).await,
            None => {
                bail!("--driver postgres needs --url postgres://user:password@host:port/database")
            }
        },
        DemoDriver::Mysql => match &args.url {
            Some(url) => processes::run(&args, Some(("mysql", url))).await,
            None => {
                bail!("--driver mysql needs --url mysql://user:password@host:port/database")
            }
        },
    }
}

/// The demo nodes' poll interval.
pub(crate) const POLL: Duration = Duration::from_millis(500);
/// How long a phase's counts must stay unchanged before it counts as
/// settled and the next event is played (three polls: a balanced node
/// gives a surplus back after seeing it on two cycles in a row).
pub(crate) const HOLD: Duration = Duration::from_millis(1500);
/// How long a phase may take to settle before the demo says so and moves
/// on (a failure).
pub(crate) const PHASE_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the demo looks at the nodes.
pub(crate) const TICK: Duration = Duration::from_millis(100);

/// The events the demo plays after starting its nodes, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Kill -9 (or crash, or sever) the busiest node.
    Kill,
    /// Stop the busiest node left gracefully.
    Stop,
    /// Start a new node.
    Join,
}

const STEPS: [Step; 3] = [Step::Kill, Step::Stop, Step::Join];

/// What runs where now, as the demo sees it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Observation {
    /// Shards running on each node now (a node running nothing may be
    /// missing).
    pub(crate) counts: BTreeMap<String, usize>,
    /// Shards running nowhere.
    pub(crate) unowned: usize,
    /// Shards running on more than one node.
    pub(crate) doubled: usize,
    /// When an agent last started or stopped anywhere, since the demo's
    /// start.
    pub(crate) last_change: Duration,
}

impl Observation {
    pub(crate) fn count(&self, node: &str) -> usize {
        self.counts.get(node).copied().unwrap_or(0)
    }
}

/// How a phase ended.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Waiting,
    /// The counts were reached `after` the event (`moved`: by agents
    /// starting or stopping after it) and held.
    Settled {
        after: Duration,
        moved: bool,
        counts: Vec<(String, usize)>,
    },
    /// Not within [`PHASE_TIMEOUT`].
    NotSettled {
        counts: Vec<(String, usize)>,
        unowned: usize,
        doubled: usize,
    },
    /// The demo ended first (its `--duration`).
    Cut,
}

/// One event and how the nodes settled after it.
#[derive(Debug, Clone)]
pub(crate) struct Phase {
    /// What happened, e.g. `kill -9 of node-1`.
    pub(crate) event: String,
    /// When, since the demo's start.
    pub(crate) at: Duration,
    /// The nodes alive after it, in order.
    pub(crate) live: Vec<String>,
    pub(crate) outcome: Outcome,
}

/// The demo's script: the phases so far and what each must settle at.
#[derive(Debug)]
pub(crate) struct Script {
    balanced: bool,
    shards: usize,
    pub(crate) phases: Vec<Phase>,
    played: usize,
}

impl Script {
    pub(crate) fn new(distributor: DemoDistributor, shards: usize) -> Self {
        Self {
            balanced: distributor == DemoDistributor::Balanced,
            shards,
            phases: Vec::new(),
            played: 0,
        }
    }

    /// Starts a phase.
    pub(crate) fn begin(&mut self, event: String, at: Duration, live: Vec<String>) {
        self.phases.push(Phase {
            event,
            at,
            live,
            outcome: Outcome::Waiting,
        });
    }

    /// The nodes alive now.
    pub(crate) fn live(&self) -> &[String] {
        self.phases.last().map(|p| p.live.as_slice()).unwrap_or(&[])
    }

    /// The counts the current phase must reach, largest first: the fair
    /// shares of the live nodes when balanced; `None` (any split that runs
    /// every shard once) otherwise.
    fn target(&self, live: usize) -> Option<Vec<usize>> {
        if !self.balanced {
            return None;
        }
        let slots: Vec<u32> = (0..u32::try_from(live).unwrap_or(u32::MAX)).collect();
        let mut shares: Vec<usize> = slots
            .iter()
            .map(|s| shardlock::fair_share(self.shards, &slots, &[*s]))
            .collect();
        shares.sort_unstable_by(|a, b| b.cmp(a));
        Some(shares)
    }

    /// What the current phase waits for, e.g. `6/6`.
    pub(crate) fn waiting_for(&self) -> String {
        match self.target(self.live().len()) {
            Some(t) => slashed(t.iter().copied()),
            None => format!("every shard running once, {} in all", self.shards),
        }
    }

    /// Looks at the current phase: settled once the live nodes run every
    /// shard exactly once (at their fair shares when balanced) and nothing
    /// changed for [`HOLD`]. Returns a line for the log when the phase
    /// ends.
    pub(crate) fn check(&mut self, obs: &Observation, now: Duration) -> Option<String> {
        let target = self.target(self.live().len());
        let shards = self.shards;
        let phase = self.phases.last_mut()?;
        if !matches!(phase.outcome, Outcome::Waiting) {
            return None;
        }
        let counts: Vec<(String, usize)> = phase
            .live
            .iter()
            .map(|n| (n.clone(), obs.count(n)))
            .collect();
        let reached = reached(&counts, obs, shards, target.as_deref());
        let steady_since = obs.last_change.max(phase.at);
        if reached && now.saturating_sub(steady_since) >= HOLD {
            let after = obs.last_change.saturating_sub(phase.at);
            let moved = obs.last_change >= phase.at;
            let line = format!(
                "settled at {} ({}), {} after the {}",
                slashed(counts.iter().map(|(_, c)| *c)),
                named(&counts),
                settle_time(after, moved),
                phase.event
            );
            phase.outcome = Outcome::Settled {
                after,
                moved,
                counts,
            };
            return Some(line);
        }
        if now.saturating_sub(phase.at) >= PHASE_TIMEOUT {
            let line = format!(
                "NOT SETTLED within {PHASE_TIMEOUT:?} of the {}: {} ({}), {} shards running nowhere, {} on two nodes",
                phase.event,
                slashed(counts.iter().map(|(_, c)| *c)),
                named(&counts),
                obs.unowned,
                obs.doubled
            );
            phase.outcome = Outcome::NotSettled {
                counts,
                unowned: obs.unowned,
                doubled: obs.doubled,
            };
            return Some(line);
        }
        None
    }

    /// The next event to play once the current phase has ended; `None`
    /// while it waits, or when the script is over (see [`over`](Self::over)).
    pub(crate) fn next(&mut self) -> Option<Step> {
        let waiting = self
            .phases
            .last()
            .is_none_or(|p| matches!(p.outcome, Outcome::Waiting));
        if waiting {
            return None;
        }
        let step = STEPS.get(self.played).copied();
        if step.is_some() {
            self.played += 1;
        }
        step
    }

    /// Whether every phase has been played and has ended.
    pub(crate) fn over(&self) -> bool {
        self.played == STEPS.len()
            && self
                .phases
                .last()
                .is_some_and(|p| !matches!(p.outcome, Outcome::Waiting))
    }

    /// Marks the phase still waiting as cut short by the end of the demo.
    pub(crate) fn cut(&mut self) {
        if let Some(p) = self.phases.last_mut() {
            if matches!(p.outcome, Outcome::Waiting) {
                p.outcome = Outcome::Cut;
            }
        }
    }

    /// Whether every phase was played and settled.
    pub(crate) fn all_settled(&self) -> bool {
        self.phases.len() == STEPS.len() + 1
            && self
                .phases
                .iter()
                .all(|p| matches!(p.outcome, Outcome::Settled { .. }))
    }

    /// The busiest live node (the first of equals), among those running
    /// something: a node running nothing would hand nothing over.
    pub(crate) fn busiest(&self, obs: &Observation) -> Option<String> {
        let mut best: Option<(&String, usize)> = None;
        for node in self.live() {
            let c = obs.count(node);
            if c > 0 && best.is_none_or(|(_, b)| c > b) {
                best = Some((node, c));
            }
        }
        best.map(|(n, _)| n.clone())
    }

    /// The live table's line about the current phase.
    pub(crate) fn status(&self, obs: &Observation, now: Duration) -> String {
        let Some(phase) = self.phases.last() else {
            return String::new();
        };
        let n = self.phases.len();
        let counts: Vec<(String, usize)> = phase
            .live
            .iter()
            .map(|n| (n.clone(), obs.count(n)))
            .collect();
        let now_counts = slashed(counts.iter().map(|(_, c)| *c));
        let target = self.target(phase.live.len());
        match &phase.outcome {
            Outcome::Waiting if reached(&counts, obs, self.shards, target.as_deref()) => format!(
                "phase {n}: {} -- {now_counts} reached, holding for {:.1} s",
                phase.event,
                HOLD.as_secs_f64()
            ),
            Outcome::Waiting => format!(
                "phase {n}: {} -- waiting for {} (now {now_counts}), {:.1}s",
                phase.event,
                self.waiting_for(),
                now.saturating_sub(phase.at).as_secs_f64()
            ),
            Outcome::Settled { .. } => format!("phase {n}: {} -- settled", phase.event),
            Outcome::NotSettled { .. } => {
                format!("phase {n}: {} -- NOT SETTLED", phase.event)
            }
            Outcome::Cut => format!("phase {n}: {} -- cut short", phase.event),
        }
    }

    /// The summary's phase lines.
    pub(crate) fn summary(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "  phases (shards per live node; settled = every shard running once{}, unchanged for {:.1} s; time from the event):",
            if self.balanced { " at the fair shares" } else { "" },
            HOLD.as_secs_f64()
        );
        for (i, phase) in self.phases.iter().enumerate() {
            let head = format!("  phase {}, {}", i + 1, phase.event);
            let _ = match &phase.outcome {
                Outcome::Settled {
                    after,
                    moved,
                    counts,
                } => writeln!(
                    out,
                    "{head}: {} ({}), settled {}",
                    slashed(counts.iter().map(|(_, c)| *c)),
                    named(counts),
                    settle_time(*after, *moved)
                ),
                Outcome::NotSettled {
                    counts,
                    unowned,
                    doubled,
                } => writeln!(
                    out,
                    "{head}: NOT SETTLED within {PHASE_TIMEOUT:?}: {} ({}), {unowned} shards running nowhere, {doubled} on two nodes{}",
                    slashed(counts.iter().map(|(_, c)| *c)),
                    named(counts),
                    self.target(phase.live.len())
                        .map(|t| format!(", wanted {}", slashed(t.into_iter())))
                        .unwrap_or_default()
                ),
                Outcome::Waiting | Outcome::Cut => {
                    writeln!(out, "{head}: did not settle before the demo ended (--duration)")
                }
            };
        }
        for step in STEPS.iter().skip(self.phases.len().saturating_sub(1)) {
            let what = match step {
                Step::Kill => "kill -9",
                Step::Stop => "graceful stop",
                Step::Join => "start of a new node",
            };
            let _ = writeln!(out, "  {what}: did not happen (the demo ended first)");
        }
    }
}

/// Whether the live nodes' `counts` run every shard exactly once, at the
/// `target` counts (any order) if there is one.
fn reached(
    counts: &[(String, usize)],
    obs: &Observation,
    shards: usize,
    target: Option<&[usize]>,
) -> bool {
    let on_live: usize = counts.iter().map(|(_, c)| c).sum();
    let mut sorted: Vec<usize> = counts.iter().map(|(_, c)| *c).collect();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    obs.unowned == 0
        && obs.doubled == 0
        && on_live == shards
        && target.is_none_or(|t| t == sorted.as_slice())
}

/// `4/4/4`.
pub(crate) fn slashed(counts: impl Iterator<Item = usize>) -> String {
    counts.map(|c| c.to_string()).collect::<Vec<_>>().join("/")
}

/// `node-1 4, node-2 4`.
fn named(counts: &[(String, usize)]) -> String {
    counts
        .iter()
        .map(|(n, c)| format!("{n} {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `1.42 s (2.8 poll intervals)`, or that nothing had to move.
fn settle_time(after: Duration, moved: bool) -> String {
    if moved {
        let secs = after.as_secs_f64();
        let polls = secs / POLL.as_secs_f64();
        if secs < 1.0 {
            format!("in {:.0} ms ({polls:.1} poll intervals)", secs * 1e3)
        } else {
            format!("in {secs:.2} s ({polls:.1} poll intervals)")
        }
    } else {
        "at once (nothing had to move)".to_string()
    }
}

/// One node's balance, for the table and the summary: `share 4 of 3
/// members, 2 moves, 1 wake-up`.
pub(crate) fn balance_note(
    members: usize,
    share: Option<usize>,
    moves: u64,
    wakeups: u64,
) -> String {
    match share {
        Some(share) => format!(
            "share {share} ({members} member{}), {moves} moved away, {wakeups} wake-up{}",
            if members == 1 { "" } else { "s" },
            if wakeups == 1 { "" } else { "s" }
        ),
        None => format!("{wakeups} wake-up{}", if wakeups == 1 { "" } else { "s" }),
    }
}

/// `N shards taken over, p50 X ms, max Y ms`, or why not.
pub(crate) fn percentiles(times: &mut [Duration]) -> String {
    times.sort();
    match (times.get(times.len() / 2), times.last()) {
        (Some(p50), Some(max)) => format!(
            "{} shards taken over, p50 {:.0} ms, max {:.0} ms",
            times.len(),
            p50.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3
        ),
        _ => "no shard moved".to_string(),
    }
}

/// One redraw of the live table.
pub(crate) struct Screen {
    /// First line.
    pub(crate) title: String,
    /// Each shard with its owner and for how many seconds, if owned.
    pub(crate) shards: Vec<(String, Option<(String, f64)>)>,
    /// Each node with its shard count and state.
    pub(crate) nodes: Vec<(String, usize, String)>,
    /// Extra line under the nodes (may be empty).
    pub(crate) note: String,
    /// The latest events, seconds since start.
    pub(crate) log: Vec<(f64, String)>,
}

impl Screen {
    /// Clears the terminal and draws the screen.
    pub(crate) fn draw(&self) {
        use std::io::Write as _;
        let mut out = String::from("\x1b[2J\x1b[H");
        let _ = writeln!(out, "{}\n", self.title);
        let _ = writeln!(out, "  {:<12} {:<10} {:>8}", "shard", "owner", "for");
        for (shard, owner) in &self.shards {
            let (owner, age) = match owner {
                Some((node, secs)) => (node.as_str(), format!("{secs:.1}s")),
                None => ("-", String::new()),
            };
            let _ = writeln!(out, "  {shard:<12} {owner:<10} {age:>8}");
        }
        out.push('\n');
        for (node, count, note) in &self.nodes {
            let _ = writeln!(out, "  {node:<8} {count:>3} shards  {note}");
        }
        let _ = writeln!(out, "\n{}", self.note);
        for (at, line) in &self.log {
            let _ = writeln!(out, "  [{at:>5.1}s] {line}");
        }
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(counts: &[(&str, usize)], unowned: usize, doubled: usize, last_ms: u64) -> Observation {
        Observation {
            counts: counts.iter().map(|(n, c)| (n.to_string(), *c)).collect(),
            unowned,
            doubled,
            last_change: Duration::from_millis(last_ms),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn balanced_phase_settles_at_the_fair_shares_once_held() {
        let mut script = Script::new(DemoDistributor::Balanced, 12);
        let live = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        script.begin("start".into(), Duration::ZERO, live);
        assert_eq!(script.waiting_for(), "4/4/4");
        // Every shard runs once, but not at the shares.
        let lopsided = obs(&[("a", 12)], 0, 0, 300);
        assert!(script.check(&lopsided, ms(5000)).is_none());
        assert!(script.next().is_none(), "still waiting");
        // At the shares, but not held long enough yet.
        let fair = obs(&[("a", 4), ("b", 4), ("c", 4)], 0, 0, 1000);
        assert!(script.check(&fair, ms(1000) + HOLD - ms(1)).is_none());
        let line = script.check(&fair, ms(1000) + HOLD).expect("settled");
        assert!(
            line.starts_with("settled at 4/4/4 (a 4, b 4, c 4), in 1.00 s"),
            "{line}"
        );
        assert_eq!(script.next(), Some(Step::Kill));
        // A shard on two nodes, or one running nowhere, is not settled.
        script.begin("kill".into(), ms(3000), vec!["b".into(), "c".into()]);
        assert_eq!(script.waiting_for(), "6/6");
        let doubled = obs(&[("b", 6), ("c", 6)], 0, 1, 3100);
        assert!(script.check(&doubled, ms(9000)).is_none());
        let unowned = obs(&[("b", 6), ("c", 5)], 1, 0, 3100);
        assert!(script.check(&unowned, ms(9000)).is_none());
        // Nothing settles in time: said, and the script moves on.
        let line = script
            .check(&unowned, ms(3000) + PHASE_TIMEOUT)
            .expect("timed out");
        assert!(line.starts_with("NOT SETTLED"), "{line}");
        assert_eq!(script.next(), Some(Step::Stop));
        assert!(!script.all_settled());
    }

    #[test]
    fn single_tenant_phase_settles_on_any_split_and_may_need_no_move() {
        let mut script = Script::new(DemoDistributor::SingleTenant, 12);
        script.begin("start".into(), Duration::ZERO, vec!["a".into(), "b".into()]);
        let all_on_a = obs(&[("a", 12)], 0, 0, 200);
        let line = script.check(&all_on_a, ms(200) + HOLD).expect("settled");
        assert!(line.starts_with("settled at 12/0"), "{line}");
        assert_eq!(script.next(), Some(Step::Kill));
        // A node joins later and nothing moves: settled after the hold,
        // counted from the event, "at once".
        script.begin("join".into(), ms(5000), vec!["a".into(), "b".into()]);
        assert!(script.check(&all_on_a, ms(5000)).is_none());
        let line = script.check(&all_on_a, ms(5000) + HOLD).expect("settled");
        assert!(line.contains("at once (nothing had to move)"), "{line}");
    }

    #[test]
    fn the_script_plays_three_events_then_ends() {
        let mut script = Script::new(DemoDistributor::Balanced, 2);
        let two = obs(&[("a", 1), ("b", 1)], 0, 0, 0);
        let mut steps = Vec::new();
        script.begin("start".into(), Duration::ZERO, vec!["a".into(), "b".into()]);
        for i in 0..10u64 {
            assert!(script.check(&two, ms(i * 10_000) + HOLD).is_some());
            match script.next() {
                Some(step) => {
                    steps.push(step);
                    script.begin(
                        format!("{step:?}"),
                        ms(i * 10_000),
                        vec!["a".into(), "b".into()],
                    );
                }
                None => break,
            }
        }
        assert_eq!(steps, [Step::Kill, Step::Stop, Step::Join]);
        assert!(script.over());
        assert!(script.all_settled());
        assert_eq!(
            script.busiest(&obs(&[("a", 1), ("b", 3)], 0, 0, 0)),
            Some("b".into())
        );
        assert_eq!(
            script.busiest(&obs(&[("a", 2), ("b", 2)], 0, 0, 0)),
            Some("a".into())
        );
        assert_eq!(script.busiest(&obs(&[], 0, 0, 0)), None);
    }
}
