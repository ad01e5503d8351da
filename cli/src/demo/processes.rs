//! The demo as real processes: `shardlock node` children sharing a lock
//! directory (or a database), one killed with SIGKILL, one stopped
//! gracefully, one started mid-run; what runs where, and the overlap check,
//! come from the nodes' own records.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::process::{Child, Command};

use super::memory::distributor_label;
use super::{
    balance_note, percentiles, DemoArgs, DemoDistributor, Observation, Screen, Script, Step, POLL,
    TICK,
};
use crate::records::{close_killed, now_ns, overlaps, read, Records, Run};

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Running,
    Killed,
    Stopped,
    Exited(String),
}

struct Node {
    id: String,
    child: Option<Child>,
    state: State,
}

/// Events the demo stages, with when they happened (ns since the epoch).
#[derive(Default)]
struct Staged {
    killed: BTreeMap<String, u128>,
    stopped: Option<(String, u128)>,
    joined: Option<(String, u128)>,
}

/// How to start a node.
struct Spawner {
    exe: PathBuf,
    work: PathBuf,
    driver_args: Vec<std::ffi::OsString>,
    schema: String,
    records: PathBuf,
    checkpoints: PathBuf,
    shards: usize,
    distributor: &'static str,
}

impl Spawner {
    fn spawn(&self, id: &str) -> Result<Node> {
        let log_path = self.work.join(format!("{id}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let log2 = log.try_clone().context("node log")?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("node")
            .args(&self.driver_args)
            .args(["--distributor", self.distributor])
            .args([
                "--schema",
                &self.schema,
                "--shards",
                &self.shards.to_string(),
                "--node-id",
                id,
            ])
            .args([
                "--poll-ms",
                &POLL.as_millis().to_string(),
                "--pause-ms",
                "200",
                "--loss-timeout-ms",
                "500",
                "--stop-timeout-ms",
                "500",
            ])
            .arg("--records")
            .arg(&self.records)
            .arg("--checkpoints")
            .arg(&self.checkpoints)
            .arg("--stop-on-stdin-eof")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("starting {id}"))?;
        Ok(Node {
            id: id.to_string(),
            child: Some(child),
            state: State::Running,
        })
    }
}

/// `server`: the driver (`postgres`, `mysql`) and URL of a real server;
/// `None`: a sqlite lock directory.
pub(crate) async fn run(args: &DemoArgs, server: Option<(&str, &str)>) -> Result<ExitCode> {
    let plain = args.plain || !std::io::stdout().is_terminal();
    let work = std::env::temp_dir().join(format!("shardlock-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let (locks, records_dir) = (work.join("locks"), work.join("records"));
    std::fs::create_dir_all(&records_dir)
        .with_context(|| format!("creating {}", records_dir.display()))?;
    let (driver_args, driver_label): (Vec<std::ffi::OsString>, String) = match server {
        Some((driver, url)) => (
            vec!["--driver".into(), driver.into(), "--url".into(), url.into()],
            driver.into(),
        ),
        None => (
            vec![
                "--driver".into(),
                "sqlite".into(),
                "--dir".into(),
                locks.clone().into(),
            ],
            format!("sqlite lock directory {}", locks.display()),
        ),
    };
    let spawner = Spawner {
        exe: std::env::current_exe().context("finding the shardlock binary")?,
        work: work.clone(),
        driver_args,
        // Fresh lock names (and balancing group) per run, so a shared
        // server's leftovers never meet us.
        schema: format!("demo{}", std::process::id()),
        records: records_dir.clone(),
        checkpoints: work.join("checkpoints"),
        shards: args.shards,
        distributor: match args.distributor {
            DemoDistributor::Balanced => "balanced",
            DemoDistributor::SingleTenant => "single-tenant",
        },
    };
    let shards: Vec<String> = crate::node::shard_names(args.shards)
        .iter()
        .map(|s| s.to_string())
        .collect();

    let t0 = now_ns();
    let mut nodes = Vec::new();
    for i in 1..=args.nodes {
        nodes.push(spawner.spawn(&format!("node-{i}"))?);
    }
    let mut script = Script::new(args.distributor, args.shards);
    let ids: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
    script.begin(format!("start of {}", ids.join(", ")), Duration::ZERO, ids);
    let mut log: Vec<(Duration, String)> = vec![(
        Duration::ZERO,
        format!(
            "started {} `shardlock node` processes over {} shards ({}, poll {} ms), {driver_label}; waiting for {}",
            args.nodes,
            args.shards,
            distributor_label(args.distributor),
            POLL.as_millis(),
            script.waiting_for()
        ),
    )];
    let since =
        |ns: u128| Duration::from_nanos(u64::try_from(ns.saturating_sub(t0)).unwrap_or(u64::MAX));
    let duration = Duration::from_secs(args.duration);
    let mut staged = Staged::default();
    let mut printed = 0;
    let mut announced = 0;
    let mut ticker = tokio::time::interval(TICK);
    loop {
        ticker.tick().await;
        let mut records = read(&records_dir)?;
        close_killed(&mut records.runs, &staged.killed);
        let now = since(now_ns());
        if now >= duration {
            log.push((
                now,
                format!("--duration {}s reached: ending the demo", args.duration),
            ));
            script.cut();
            break;
        }
        let obs = observe(&records.runs, &shards, t0);
        for node in nodes.iter_mut().filter(|n| n.state == State::Running) {
            if let Some(Ok(Some(status))) = node.child.as_mut().map(Child::try_wait) {
                node.state = State::Exited(status.to_string());
                let path = work.join(format!("{}.log", node.id));
                log.push((
                    now,
                    format!(
                        "{} exited unexpectedly with {status}; see {}",
                        node.id,
                        path.display()
                    ),
                ));
            }
        }
        if let Some(line) = script.check(&obs, now) {
            log.push((now, line));
        }
        match script.next() {
            Some(Step::Kill) => {
                if let Some(node) = pick(&mut nodes, script.busiest(&obs)) {
                    let count = obs.count(&node.id);
                    let at = now_ns();
                    if let Some(child) = node.child.as_mut() {
                        child.start_kill().context("SIGKILL")?;
                    }
                    staged.killed.insert(node.id.clone(), at);
                    node.state = State::Killed;
                    let id = node.id.clone();
                    log.push((
                        since(at),
                        format!("{id} killed with SIGKILL while running {count} shards"),
                    ));
                    script.begin(format!("kill -9 of {id}"), since(at), live(&nodes));
                    log.push((since(at), format!("waiting for {}", script.waiting_for())));
                }
            }
            Some(Step::Stop) => {
                if let Some(node) = pick(&mut nodes, script.busiest(&obs)) {
                    let count = obs.count(&node.id);
                    // The time is taken before the node is told: it may
                    // stop its agents (and record it) within a fraction of
                    // a millisecond.
                    let at = now_ns();
                    staged.stopped = Some((node.id.clone(), at));
                    if let Some(child) = node.child.as_mut() {
                        drop(child.stdin.take()); // EOF on stdin: graceful stop
                    }
                    node.state = State::Stopped;
                    let id = node.id.clone();
                    log.push((
                        since(at),
                        format!("{id} stops gracefully ({count} shards to hand over)"),
                    ));
                    script.begin(format!("graceful stop of {id}"), since(at), live(&nodes));
                    log.push((since(at), format!("waiting for {}", script.waiting_for())));
                }
            }
            Some(Step::Join) => {
                let id = format!("node-{}", nodes.len() + 1);
                let at = now_ns();
                nodes.push(spawner.spawn(&id)?);
                staged.joined = Some((id.clone(), at));
                log.push((since(at), format!("{id} starts and joins")));
                script.begin(format!("start of {id}"), since(at), live(&nodes));
                log.push((since(at), format!("waiting for {}", script.waiting_for())));
            }
            None => {}
        }
        announced = announce_moves(&records.runs, announced, t0, &mut log);
        if plain {
            for (at, line) in &log[printed..] {
                println!("[{:>6.2}s] {line}", at.as_secs_f64());
            }
            printed = log.len();
        } else {
            draw(&nodes, &records, &shards, &script, &obs, now, args, &log);
        }
        if script.over() {
            break;
        }
    }

    // End: what each node saw, then stop the survivors gracefully (what
    // moves while they stop is not part of the demo), then read the final
    // records.
    let ended = now_ns();
    let at_end = read(&records_dir)?;
    let notes: Vec<String> = nodes
        .iter()
        .map(|node| format!("  {}: {}", node.id, node_note(node, &at_end, false)))
        .collect();
    for node in &mut nodes {
        if let Some(child) = node.child.as_mut() {
            drop(child.stdin.take());
        }
    }
    for node in &mut nodes {
        if let Some(mut child) = node.child.take() {
            match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
                Ok(Ok(status)) if !status.success() && node.state != State::Killed => {
                    log.push((
                        since(now_ns()),
                        format!(
                            "{} exited with {status}; see {}",
                            node.id,
                            work.join(format!("{}.log", node.id)).display()
                        ),
                    ));
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill().await;
                    log.push((
                        since(now_ns()),
                        format!("{} did not stop within 10 s and was killed", node.id),
                    ));
                }
            }
        }
    }
    let mut records = read(&records_dir)?;
    close_killed(&mut records.runs, &staged.killed);
    announce_moves(&records.runs, announced, t0, &mut log);
    if plain {
        for (at, line) in &log[printed..] {
            println!("[{:>6.2}s] {line}", at.as_secs_f64());
        }
    }
    let found = overlaps(&records.runs);
    for (a, b) in &found {
        println!(
            "OVERLAP: {} ran on {} and {} at once",
            a.shard, a.node, b.node
        );
    }
    let before_end: Vec<Run> = records
        .runs
        .iter()
        .filter(|r| r.start < ended)
        .cloned()
        .collect();
    println!(
        "{}",
        summary(&before_end, &staged, &script, &notes, args, found.len())
    );
    if args.keep {
        println!(
            "node logs, records and the lock directory are in {}",
            work.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(if found.is_empty() && script.all_settled() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn pick(nodes: &mut [Node], id: Option<String>) -> Option<&mut Node> {
    let id = id?;
    nodes.iter_mut().find(|n| n.id == id)
}

fn live(nodes: &[Node]) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| n.state == State::Running)
        .map(|n| n.id.clone())
        .collect()
}

/// What runs where now, from the records.
fn observe(runs: &[Run], shards: &[String], t0: u128) -> Observation {
    let mut per_shard: BTreeMap<&str, usize> = BTreeMap::new();
    let mut obs = Observation::default();
    let mut last = t0;
    for run in runs {
        last = last.max(run.start).max(run.stop.unwrap_or(0));
        if run.stop.is_none() {
            *per_shard.entry(run.shard.as_str()).or_default() += 1;
            *obs.counts.entry(run.node.clone()).or_default() += 1;
        }
    }
    for shard in shards {
        match per_shard.get(shard.as_str()).copied().unwrap_or(0) {
            0 => obs.unowned += 1,
            1 => {}
            _ => obs.doubled += 1,
        }
    }
    obs.last_change =
        Duration::from_nanos(u64::try_from(last.saturating_sub(t0)).unwrap_or(u64::MAX));
    obs
}

/// Shard → node running it now (the first, if several).
fn current_owners(runs: &[Run]) -> BTreeMap<String, (String, u128)> {
    let mut out = BTreeMap::new();
    for r in runs.iter().filter(|r| r.stop.is_none()) {
        out.entry(r.shard.clone())
            .or_insert_with(|| (r.node.clone(), r.start));
    }
    out
}

/// Adds a log line for each shard that started on a node other than its
/// previous one; returns how many runs were looked at.
fn announce_moves(runs: &[Run], seen: usize, t0: u128, log: &mut Vec<(Duration, String)>) -> usize {
    let mut sorted: Vec<&Run> = runs.iter().collect();
    sorted.sort_by_key(|r| r.start);
    let mut last: BTreeMap<&str, &Run> = BTreeMap::new();
    for (i, run) in sorted.iter().enumerate() {
        if i >= seen {
            if let Some(prev) = last.get(run.shard.as_str()) {
                if prev.node != run.node {
                    let gap = prev.stop.map(|s| run.start.saturating_sub(s)).unwrap_or(0);
                    log.push((
                        Duration::from_nanos(run.start.saturating_sub(t0) as u64),
                        format!(
                            "{} moved {} -> {} ({:.0} ms with no owner)",
                            run.shard,
                            prev.node,
                            run.node,
                            gap as f64 / 1e6
                        ),
                    ));
                }
            }
        }
        last.insert(run.shard.as_str(), run);
    }
    sorted.len()
}

fn state_label(state: &State) -> String {
    match state {
        State::Running => "running".into(),
        State::Killed => "killed (SIGKILL)".into(),
        State::Stopped => "stopped gracefully".into(),
        State::Exited(status) => format!("exited ({status})"),
    }
}

/// The node's state and, from its latest assignment record, its balance;
/// padded for the table.
fn node_note(node: &Node, records: &Records, padded: bool) -> String {
    let state = state_label(&node.state);
    match records.assignments.get(&node.id) {
        Some(a) => {
            let balance = balance_note(a.members, a.share, a.moves, a.wakeups);
            if padded {
                format!("{state:<18} {balance}")
            } else {
                format!("{state}, {balance}")
            }
        }
        None => state,
    }
}

#[allow(clippy::too_many_arguments)]
fn draw(
    nodes: &[Node],
    records: &Records,
    shards: &[String],
    script: &Script,
    obs: &Observation,
    now: Duration,
    args: &DemoArgs,
    log: &[(Duration, String)],
) {
    let owners = current_owners(&records.runs);
    let now_ns = now_ns();
    Screen {
        title: format!(
            "shardlock demo: {} shards, node processes, {}   t = {:.1}s",
            args.shards,
            distributor_label(args.distributor),
            now.as_secs_f64(),
        ),
        shards: shards
            .iter()
            .map(|shard| {
                let owner = owners.get(shard).map(|(node, since)| {
                    (node.clone(), now_ns.saturating_sub(*since) as f64 / 1e9)
                });
                (shard.clone(), owner)
            })
            .collect(),
        nodes: nodes
            .iter()
            .map(|n| (n.id.clone(), obs.count(&n.id), node_note(n, records, true)))
            .collect(),
        note: format!("  {}\n", script.status(obs, now)),
        log: log
            .iter()
            .rev()
            .take(8)
            .rev()
            .map(|(at, line)| (at.as_secs_f64(), line.clone()))
            .collect(),
    }
    .draw();
}

/// Per-shard times from an event at `at` to the first start of each
/// shard `node` ran at that moment, on another node.
fn takeovers(runs: &[Run], node: &str, at: u128) -> Vec<Duration> {
    let shards: BTreeSet<&str> = runs
        .iter()
        .filter(|r| r.node == node && r.start <= at && r.stop.is_none_or(|s| s >= at))
        .map(|r| r.shard.as_str())
        .collect();
    shards
        .iter()
        .filter_map(|shard| {
            runs.iter()
                .filter(|r| r.shard == *shard && r.node != node && r.start >= at)
                .map(|r| r.start)
                .min()
                .map(|start| Duration::from_nanos(start.saturating_sub(at) as u64))
        })
        .collect()
}

/// Per-shard times from `node`'s start at `at` to each shard's first start
/// on it.
fn arrivals(runs: &[Run], node: &str, at: u128) -> Vec<Duration> {
    let mut first: BTreeMap<&str, u128> = BTreeMap::new();
    for r in runs.iter().filter(|r| r.node == node && r.start >= at) {
        let e = first.entry(r.shard.as_str()).or_insert(r.start);
        *e = (*e).min(r.start);
    }
    first
        .values()
        .map(|start| Duration::from_nanos(start.saturating_sub(at) as u64))
        .collect()
}

/// The phases, the handover times per staged event, each node's balance,
/// and the overlaps, from the nodes' records.
fn summary(
    runs: &[Run],
    staged: &Staged,
    script: &Script,
    notes: &[String],
    args: &DemoArgs,
    overlap_count: usize,
) -> String {
    let mut out = String::from("\nsummary (from the nodes' own records)\n");
    let _ = writeln!(
        out,
        "  {}, {} node processes, poll {} ms",
        distributor_label(args.distributor),
        notes.len(),
        POLL.as_millis()
    );
    script.summary(&mut out);
    if let Some((node, at)) = staged.killed.iter().next() {
        let _ = writeln!(
            out,
            "  kill -9 of {node} (time from kill to new owner): {}",
            percentiles(&mut takeovers(runs, node, *at))
        );
    }
    if let Some((node, at)) = &staged.stopped {
        let _ = writeln!(
            out,
            "  graceful stop of {node} (time from stop to new owner): {}",
            percentiles(&mut takeovers(runs, node, *at))
        );
    }
    if let Some((node, at)) = &staged.joined {
        let _ = writeln!(
            out,
            "  start of {node} (time from its start to each shard running on it): {}",
            percentiles(&mut arrivals(runs, node, *at))
        );
    }
    for note in notes {
        let _ = writeln!(out, "{note}");
    }
    let _ = write!(out, "overlaps: {overlap_count}");
    out
}
