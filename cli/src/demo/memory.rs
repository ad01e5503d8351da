//! `shardlock demo`: nodes sharing shards, one stopped, one severed, live.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use shardlock::memory::{MemoryDriver, MemoryServer};
use shardlock::{Coordinator, CoordinatorHandle, DatabaseId, NodeId, ShardId, SingleTenant};

use super::{percentiles, DemoArgs, Screen};
use crate::tracker::{DemoAgent, Move, Tracker};

/// Coordinator timings of the demo: fast, and inside the server's window.
const POLL: Duration = Duration::from_millis(500);
const LOSS_TIMEOUT: Duration = Duration::from_millis(500);
const STOP_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the server keeps a severed node's locks (its "keepalive").
const RELEASE_WINDOW: Duration = Duration::from_secs(2);
/// When the severed node's network comes back.
const HEAL_AFTER: Duration = Duration::from_secs(3);

enum NodeState {
    Running(CoordinatorHandle),
    Stopped,
}

struct Node {
    id: NodeId,
    driver: MemoryDriver,
    state: NodeState,
    note: &'static str,
}

/// The in-process demo: every node in this process, on the memory driver.
pub(crate) async fn run(args: &DemoArgs) -> Result<ExitCode> {
    let plain = args.plain || !std::io::stdout().is_terminal();
    let duration = Duration::from_secs(args.duration);

    let server = MemoryServer::with_release_window(RELEASE_WINDOW);
    let tracker = Tracker::default();
    let database = DatabaseId::new("demo");
    let shards: Vec<ShardId> = crate::node::shard_names(args.shards);
    let mut nodes = Vec::new();
    for i in 0..args.nodes {
        let id = NodeId::new(format!("node-{}", i + 1));
        let driver = server.driver();
        let distributor = SingleTenant::new(database.clone(), "demo", shards.iter().cloned());
        let handle = Coordinator::builder(driver.clone(), distributor, DemoAgent(tracker.clone()))
            .node_id(id.clone())
            .poll_interval(POLL)
            .pause_interval(Duration::from_millis(200))
            .lock_loss_timeout(LOSS_TIMEOUT)
            .stop_timeout(STOP_TIMEOUT)
            .build()
            .context("building a demo node")?
            .start()
            .context("starting a demo node")?;
        nodes.push(Node {
            id,
            driver,
            state: NodeState::Running(handle),
            note: "running",
        });
    }
    tracker.note(format!(
        "started {} nodes over {} shards (memory driver, poll {POLL:?}, server release window {RELEASE_WINDOW:?})",
        args.nodes, args.shards
    ));

    let started = Instant::now();
    let stop_at = duration / 4;
    let sever_at = duration * 2 / 5;
    let mut stopped: Option<(NodeId, Instant)> = None;
    let mut severed: Option<(NodeId, Instant)> = None;
    let mut fenced = false;
    let mut printed = 0;
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    loop {
        ticker.tick().await;
        let elapsed = started.elapsed();
        if elapsed >= duration {
            break;
        }
        if stopped.is_none() && elapsed >= stop_at {
            if let Some(i) = busiest(&nodes, &tracker, |_| true) {
                let node = &mut nodes[i];
                let count = shards_of(&tracker, &node.id);
                tracker.note(format!(
                    "{} stops gracefully ({count} shards to hand over)",
                    node.id
                ));
                if let NodeState::Running(handle) =
                    std::mem::replace(&mut node.state, NodeState::Stopped)
                {
                    handle.stop().await.context("stopping a node")?;
                }
                node.note = "stopped";
                stopped = Some((node.id.clone(), Instant::now()));
            }
        }
        if severed.is_none() && elapsed >= sever_at {
            if let Some(i) = busiest(&nodes, &tracker, |n| {
                matches!(n.state, NodeState::Running(_))
            }) {
                let node = &mut nodes[i];
                let count = shards_of(&tracker, &node.id);
                tracker.note(format!(
                    "{}'s connection is severed ({count} shards); it must stop its work before the server frees its locks",
                    node.id
                ));
                node.driver.sever();
                node.note = "severed";
                severed = Some((node.id.clone(), Instant::now()));
            }
        }
        if let Some((victim, at)) = &severed {
            if !fenced && shards_of(&tracker, victim) == 0 {
                fenced = true;
                tracker.note(format!(
                    "{victim} fenced itself: all its agents stopped {:.0} ms after the sever, before the server frees its locks",
                    at.elapsed().as_secs_f64() * 1e3
                ));
            }
            if at.elapsed() >= HEAL_AFTER {
                if let Some(node) = nodes
                    .iter_mut()
                    .find(|n| &n.id == victim && n.note == "severed")
                {
                    node.driver.heal();
                    node.note = "network back, competing again";
                    tracker.note(format!(
                        "{victim}'s network is back; it reconnects and competes again"
                    ));
                }
            }
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
            draw(&nodes, &tracker, &shards, started, duration);
        }
    }

    for node in &mut nodes {
        if let NodeState::Running(handle) = std::mem::replace(&mut node.state, NodeState::Stopped) {
            handle.stop().await.context("stopping a node")?;
        }
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
    println!(
        "{}",
        summary(
            &tracker.moves(),
            stopped.as_ref(),
            severed.as_ref(),
            overlaps
        )
    );
    Ok(if overlaps == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn shards_of(tracker: &Tracker, node: &NodeId) -> usize {
    tracker
        .owners()
        .values()
        .filter(|owners| owners.iter().any(|(n, _)| n == node))
        .count()
}

fn busiest(nodes: &[Node], tracker: &Tracker, eligible: impl Fn(&Node) -> bool) -> Option<usize> {
    nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| eligible(n))
        .max_by_key(|(_, n)| shards_of(tracker, &n.id))
        .map(|(i, _)| i)
}

fn draw(
    nodes: &[Node],
    tracker: &Tracker,
    shards: &[ShardId],
    started: Instant,
    duration: Duration,
) {
    let owners = tracker.owners();
    let now = Instant::now();
    Screen {
        title: format!(
            "shardlock demo: {} nodes, {} shards, memory driver   t = {:.1}s / {}s",
            nodes.len(),
            shards.len(),
            started.elapsed().as_secs_f64(),
            duration.as_secs()
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
            .map(|n| (n.id.to_string(), shards_of(tracker, &n.id), n.note))
            .collect(),
        note: format!("  overlaps so far: {}\n", tracker.overlaps()),
        log: tracker
            .log_tail(6)
            .into_iter()
            .map(|(at, line)| (at.saturating_duration_since(started).as_secs_f64(), line))
            .collect(),
    }
    .draw();
}

fn summary(
    moves: &[Move],
    stopped: Option<&(NodeId, Instant)>,
    severed: Option<&(NodeId, Instant)>,
    overlaps: u64,
) -> String {
    let mut out = String::from("\nsummary\n");
    let mut line = |label: &str, event: Option<&(NodeId, Instant)>, measure_from_event: bool| {
        let Some((node, at)) = event else {
            let _ = writeln!(out, "  {label}: did not happen (the demo ended first)");
            return;
        };
        let mut times: Vec<Duration> = moves
            .iter()
            .filter(|m| &m.from == node && m.at >= *at)
            .map(|m| {
                if measure_from_event {
                    m.at.saturating_duration_since(*at)
                } else {
                    m.gap
                }
            })
            .collect();
        let _ = writeln!(out, "  {label} of {node}: {}", percentiles(&mut times));
    };
    line(
        "graceful stop (gap between old stop and new start)",
        stopped,
        false,
    );
    line(
        "sever (time from sever to takeover, includes the server's release window)",
        severed,
        true,
    );
    let _ = write!(out, "overlaps: {overlaps}");
    out
}
