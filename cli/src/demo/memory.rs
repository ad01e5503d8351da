//! The demo inside this process, on the in-memory driver.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use shardlock::memory::{MemoryDriver, MemoryServer};
use shardlock::{
    Assignment, Balancing, Coordinator, CoordinatorHandle, DatabaseId, NodeId, ShardId,
};
use tokio::sync::watch;

use super::{
    balance_note, percentiles, DemoArgs, DemoDistributor, Observation, Screen, Script, Step, POLL,
    TICK,
};
use crate::node::AnyDistributor;
use crate::tracker::{DemoAgent, Move, Tracker};

/// Coordinator timings of the demo: fast, and inside the server's window.
const LOSS_TIMEOUT: Duration = Duration::from_millis(500);
const STOP_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the server keeps a severed node's locks (its "keepalive").
const RELEASE_WINDOW: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Crashed,
    Severed,
    Stopped,
}

struct Node {
    id: NodeId,
    driver: MemoryDriver,
    handle: Option<CoordinatorHandle>,
    /// Still readable after the coordinator is gone: its last assignment.
    assignment: watch::Receiver<Assignment>,
    state: State,
}

/// Everything a node needs that does not change between nodes.
struct Cluster {
    server: MemoryServer,
    tracker: Tracker,
    database: DatabaseId,
    shards: Vec<ShardId>,
    balancing: Option<Balancing>,
}

impl Cluster {
    fn start(&self, id: NodeId) -> Result<Node> {
        let driver = self.server.driver();
        let distributor = AnyDistributor::single_tenant(
            self.database.clone(),
            "demo",
            self.shards.clone(),
            self.balancing.as_ref(),
        );
        let handle =
            Coordinator::builder(driver.clone(), distributor, DemoAgent(self.tracker.clone()))
                .node_id(id.clone())
                .poll_interval(POLL)
                .pause_interval(Duration::from_millis(200))
                .lock_loss_timeout(LOSS_TIMEOUT)
                .stop_timeout(STOP_TIMEOUT)
                .build()
                .context("building a demo node")?
                .start()
                .context("starting a demo node")?;
        Ok(Node {
            id,
            driver,
            assignment: handle.assignment(),
            handle: Some(handle),
            state: State::Running,
        })
    }
}

/// The in-process demo: every node in this process, on the memory driver.
pub(crate) async fn run(args: &DemoArgs) -> Result<ExitCode> {
    let plain = args.plain || !std::io::stdout().is_terminal();
    let duration = Duration::from_secs(args.duration);
    let balancing = (args.distributor == DemoDistributor::Balanced).then(|| {
        let mut b = Balancing::new();
        b.group = crate::node::default_group("demo", "demo");
        b
    });
    let cluster = Cluster {
        server: MemoryServer::with_release_window(RELEASE_WINDOW),
        tracker: Tracker::default(),
        database: DatabaseId::new("demo"),
        shards: crate::node::shard_names(args.shards),
        balancing,
    };
    let tracker = cluster.tracker.clone();
    let mut script = Script::new(args.distributor, args.shards);
    let mut nodes = Vec::new();
    let started = Instant::now();
    for i in 0..args.nodes {
        nodes.push(cluster.start(NodeId::new(format!("node-{}", i + 1)))?);
    }
    let ids: Vec<String> = nodes.iter().map(|n| n.id.to_string()).collect();
    script.begin(format!("start of {}", ids.join(", ")), Duration::ZERO, ids);
    tracker.note(format!(
        "started {} nodes over {} shards ({}, memory driver, poll {POLL:?}); waiting for {}",
        args.nodes,
        args.shards,
        distributor_label(args.distributor),
        script.waiting_for()
    ));

    let mut crashed: Option<(NodeId, Instant)> = None;
    let mut stopped: Option<(NodeId, Instant)> = None;
    let mut joined: Option<(NodeId, Instant)> = None;
    let mut fenced = false;
    let mut printed = 0;
    let mut ticker = tokio::time::interval(TICK);
    loop {
        ticker.tick().await;
        let now = started.elapsed();
        if now >= duration {
            tracker.note(format!(
                "--duration {}s reached: ending the demo",
                args.duration
            ));
            script.cut();
            break;
        }
        let obs = observe(&tracker, &cluster.shards, started);
        if let Some(line) = script.check(&obs, now) {
            tracker.note(line);
        }
        if let Some((victim, at)) = &crashed {
            if args.sever && !fenced && obs.count(victim.as_str()) == 0 {
                fenced = true;
                tracker.note(format!(
                    "{victim} fenced itself: all its agents stopped {:.0} ms after the sever, before the server frees its locks ({RELEASE_WINDOW:?})",
                    at.elapsed().as_secs_f64() * 1e3
                ));
            }
        }
        match script.next() {
            Some(Step::Kill) => {
                if let Some(victim) = script.busiest(&obs) {
                    let node = find(&mut nodes, &victim)?;
                    let count = obs.count(&victim);
                    let at = Instant::now();
                    let event = if args.sever {
                        node.driver.sever();
                        node.state = State::Severed;
                        tracker.note(format!(
                            "{victim}'s network is severed for good ({count} shards); it must stop its work before the server frees its locks"
                        ));
                        format!("sever of {victim}")
                    } else {
                        // As kill -9: the work stops with no graceful
                        // release, the server frees the locks as the
                        // connections drop.
                        if let Some(handle) = node.handle.take() {
                            handle.abort().await;
                        }
                        node.driver.kill();
                        node.state = State::Crashed;
                        tracker.note(format!(
                            "{victim} crashed (as kill -9: coordinator aborted, connections dropped) while running {count} shards"
                        ));
                        format!("crash (as kill -9) of {victim}")
                    };
                    crashed = Some((node.id.clone(), at));
                    script.begin(event, at.saturating_duration_since(started), live(&nodes));
                    tracker.note(format!("waiting for {}", script.waiting_for()));
                }
            }
            Some(Step::Stop) => {
                if let Some(victim) = script.busiest(&obs) {
                    let node = find(&mut nodes, &victim)?;
                    let count = obs.count(&victim);
                    tracker.note(format!(
                        "{victim} stops gracefully ({count} shards to hand over)"
                    ));
                    let at = Instant::now();
                    node.state = State::Stopped;
                    let handle = node.handle.take();
                    stopped = Some((node.id.clone(), at));
                    script.begin(
                        format!("graceful stop of {victim}"),
                        at.saturating_duration_since(started),
                        live(&nodes),
                    );
                    if let Some(handle) = handle {
                        handle.stop().await.context("stopping a node")?;
                    }
                    tracker.note(format!("waiting for {}", script.waiting_for()));
                }
            }
            Some(Step::Join) => {
                let id = NodeId::new(format!("node-{}", nodes.len() + 1));
                let at = Instant::now();
                nodes.push(cluster.start(id.clone())?);
                tracker.note(format!("{id} starts and joins"));
                script.begin(
                    format!("start of {id}"),
                    at.saturating_duration_since(started),
                    live(&nodes),
                );
                joined = Some((id, at));
                tracker.note(format!("waiting for {}", script.waiting_for()));
            }
            None => {}
        }
        if plain {
            let (next, lines) = tracker.log_since(printed);
            printed = next;
            for (at, line) in lines {
                println!(
                    "[{:>6.2}s] {line}",
                    at.saturating_duration_since(started).as_secs_f64()
                );
            }
        } else {
            draw(
                &nodes,
                &tracker,
                &cluster.shards,
                &script,
                &obs,
                started,
                args,
            );
        }
        if script.over() {
            break;
        }
    }

    // The script is over: what each node saw, then stop them all at once
    // (what moves while they stop is not part of the demo).
    let ended = Instant::now();
    let notes: Vec<String> = nodes
        .iter()
        .map(|node| {
            let a = node.assignment.borrow();
            format!(
                "  {}: {}, {}",
                node.id,
                state_label(node.state),
                balance_note(a.members, a.share, a.moves, a.wakeups)
            )
        })
        .collect();
    tracker.note("stopping every node".to_string());
    let stopping: Vec<_> = nodes
        .iter_mut()
        .filter_map(|n| n.handle.take())
        .map(|handle| tokio::spawn(handle.stop()))
        .collect();
    for task in stopping {
        task.await
            .context("stopping a node")?
            .context("stopping a node")?;
    }
    if plain {
        let (_, lines) = tracker.log_since(printed);
        for (at, line) in lines {
            println!(
                "[{:>6.2}s] {line}",
                at.saturating_duration_since(started).as_secs_f64()
            );
        }
    }
    let overlaps = tracker.overlaps();
    let mut out = String::from("\nsummary\n");
    let _ = writeln!(
        out,
        "  {}, memory driver, poll {} ms",
        distributor_label(args.distributor),
        POLL.as_millis()
    );
    script.summary(&mut out);
    let moves: Vec<Move> = tracker
        .moves()
        .into_iter()
        .filter(|m| m.at < ended)
        .collect();
    handovers(
        &mut out,
        &moves,
        crashed.as_ref(),
        stopped.as_ref(),
        joined.as_ref(),
        args.sever,
    );
    for note in notes {
        let _ = writeln!(out, "{note}");
    }
    let _ = write!(out, "overlaps: {overlaps}");
    println!("{out}");
    Ok(if overlaps == 0 && script.all_settled() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub(crate) fn distributor_label(d: DemoDistributor) -> &'static str {
    match d {
        DemoDistributor::Balanced => "balanced (fair share)",
        DemoDistributor::SingleTenant => "single-tenant (no balancing: standbys)",
    }
}

fn state_label(state: State) -> &'static str {
    match state {
        State::Running => "running",
        State::Crashed => "crashed",
        State::Severed => "severed",
        State::Stopped => "stopped",
    }
}

fn find<'a>(nodes: &'a mut [Node], id: &str) -> Result<&'a mut Node> {
    nodes
        .iter_mut()
        .find(|n| n.id.as_str() == id)
        .with_context(|| format!("BUG: no demo node {id}"))
}

fn live(nodes: &[Node]) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| n.state == State::Running)
        .map(|n| n.id.to_string())
        .collect()
}

fn observe(tracker: &Tracker, shards: &[ShardId], started: Instant) -> Observation {
    let owners = tracker.owners();
    let mut obs = Observation {
        last_change: tracker
            .last_change()
            .map(|at| at.saturating_duration_since(started))
            .unwrap_or_default(),
        ..Observation::default()
    };
    for shard in shards {
        let running = owners.get(shard).map(Vec::len).unwrap_or(0);
        match running {
            0 => obs.unowned += 1,
            1 => {}
            _ => obs.doubled += 1,
        }
    }
    for runs in owners.values() {
        for (node, _) in runs {
            *obs.counts.entry(node.to_string()).or_default() += 1;
        }
    }
    obs
}

fn draw(
    nodes: &[Node],
    tracker: &Tracker,
    shards: &[ShardId],
    script: &Script,
    obs: &Observation,
    started: Instant,
    args: &DemoArgs,
) {
    let owners = tracker.owners();
    let now = Instant::now();
    Screen {
        title: format!(
            "shardlock demo: {} shards, memory driver, {}   t = {:.1}s",
            shards.len(),
            distributor_label(args.distributor),
            started.elapsed().as_secs_f64(),
        ),
        shards: shards
            .iter()
            .map(|shard| {
                let owner = owners
                    .get(shard)
                    .and_then(|o| o.first())
                    .map(|(node, since)| {
                        (
                            node.to_string(),
                            now.saturating_duration_since(*since).as_secs_f64(),
                        )
                    });
                (shard.to_string(), owner)
            })
            .collect(),
        nodes: nodes
            .iter()
            .map(|n| {
                let a = n.assignment.borrow();
                (
                    n.id.to_string(),
                    obs.count(n.id.as_str()),
                    format!(
                        "{:<8} {}",
                        state_label(n.state),
                        balance_note(a.members, a.share, a.moves, a.wakeups)
                    ),
                )
            })
            .collect(),
        note: format!(
            "  {}\n  overlaps so far: {}\n",
            script.status(obs, started.elapsed()),
            tracker.overlaps()
        ),
        log: tracker
            .log_tail(8)
            .into_iter()
            .map(|(at, line)| (at.saturating_duration_since(started).as_secs_f64(), line))
            .collect(),
    }
    .draw();
}

/// The per-shard handover times of each event.
fn handovers(
    out: &mut String,
    moves: &[Move],
    crashed: Option<&(NodeId, Instant)>,
    stopped: Option<&(NodeId, Instant)>,
    joined: Option<&(NodeId, Instant)>,
    sever: bool,
) {
    if let Some((node, at)) = crashed {
        let mut times: Vec<Duration> = moves
            .iter()
            .filter(|m| &m.from == node && m.at >= *at)
            .map(|m| m.at.saturating_duration_since(*at))
            .collect();
        let what = if sever {
            format!("sever of {node} (time from sever to new owner, includes the server's release window)")
        } else {
            format!("crash of {node} (time from crash to new owner)")
        };
        let _ = writeln!(out, "  {what}: {}", percentiles(&mut times));
    }
    if let Some((node, at)) = stopped {
        let mut gaps: Vec<Duration> = moves
            .iter()
            .filter(|m| &m.from == node && m.at >= *at)
            .map(|m| m.gap)
            .collect();
        let _ = writeln!(
            out,
            "  graceful stop of {node} (gap between old stop and new start): {}",
            percentiles(&mut gaps)
        );
    }
    if let Some((node, at)) = joined {
        let mut gaps: Vec<Duration> = moves
            .iter()
            .filter(|m| &m.to == node && m.at >= *at)
            .map(|m| m.gap)
            .collect();
        let _ = writeln!(
            out,
            "  start of {node} (gap between old stop and new start of the sets moved to it): {}",
            percentiles(&mut gaps)
        );
    }
}
