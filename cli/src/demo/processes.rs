//! The demo as real processes: `shardlock node` children sharing a lock
//! directory (or a database), one killed with SIGKILL, one stopped
//! gracefully; overlaps are checked from the nodes' own records.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::process::{Child, Command};

use super::{percentiles, DemoArgs, Screen};
use crate::records::{close_killed, now_ns, overlaps, read_runs, Run};

struct Node {
    id: String,
    child: Option<Child>,
    note: String,
}

/// Events the demo stages, with when they happened (ns since the epoch).
#[derive(Default)]
struct Staged {
    killed: BTreeMap<String, u128>,
    stopped: Option<(String, u128)>,
}

pub(crate) async fn run(args: &DemoArgs, url: Option<&str>) -> Result<ExitCode> {
    let plain = args.plain || !std::io::stdout().is_terminal();
    let work = std::env::temp_dir().join(format!("shardlock-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let (locks, records, checkpoints) = (
        work.join("locks"),
        work.join("records"),
        work.join("checkpoints"),
    );
    std::fs::create_dir_all(&records).with_context(|| format!("creating {}", records.display()))?;
    let exe = std::env::current_exe().context("finding the shardlock binary")?;
    let (driver_args, driver_label): (Vec<std::ffi::OsString>, String) = match url {
        Some(url) => (
            vec![
                "--driver".into(),
                "postgres".into(),
                "--url".into(),
                url.into(),
            ],
            "postgres".into(),
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
    // Fresh lock names per run, so a shared server's leftovers never meet us.
    let schema = format!("demo{}", std::process::id());

    let mut nodes = Vec::new();
    for i in 1..=args.nodes {
        let id = format!("node-{i}");
        let child = spawn_node(
            &exe,
            &work,
            &driver_args,
            &schema,
            &records,
            &checkpoints,
            &id,
            args.shards,
        )?;
        nodes.push(Node {
            id,
            child: Some(child),
            note: "running".into(),
        });
    }
    let started = Instant::now();
    let t0 = now_ns();
    let mut log: Vec<(Duration, String)> = vec![(
        Duration::ZERO,
        format!(
            "started {} `shardlock node` processes over {} shards, {driver_label}",
            args.nodes, args.shards
        ),
    )];
    let duration = Duration::from_secs(args.duration);
    let (kill_at, stop_at) = (duration / 4, duration / 2);
    let mut staged = Staged::default();
    let mut printed = 0;
    let mut announced = 0;
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    while started.elapsed() < duration {
        ticker.tick().await;
        let mut runs = read_runs(&records)?;
        close_killed(&mut runs, &staged.killed);
        let owners = current_owners(&runs);
        if staged.killed.is_empty() && started.elapsed() >= kill_at {
            if let Some(node) = busiest(&mut nodes, &owners) {
                let count = owned_by(&owners, &node.id);
                let at = now_ns();
                if let Some(child) = node.child.as_mut() {
                    child.start_kill().context("SIGKILL")?;
                }
                staged.killed.insert(node.id.clone(), at);
                node.note = "killed (SIGKILL)".into();
                log.push((
                    started.elapsed(),
                    format!(
                        "{} killed with SIGKILL while running {count} shards",
                        node.id
                    ),
                ));
            }
        }
        if staged.stopped.is_none() && started.elapsed() >= stop_at {
            if let Some(node) = busiest(&mut nodes, &owners) {
                let count = owned_by(&owners, &node.id);
                // The time is taken before the node is told: it may stop
                // its agents (and record it) within a fraction of a
                // millisecond.
                staged.stopped = Some((node.id.clone(), now_ns()));
                if let Some(child) = node.child.as_mut() {
                    drop(child.stdin.take()); // EOF on stdin: graceful stop
                }
                node.note = "stopped gracefully".into();
                log.push((
                    started.elapsed(),
                    format!("{} stops gracefully ({count} shards to hand over)", node.id),
                ));
            }
        }
        for node in nodes.iter_mut().filter(|n| n.note == "running") {
            if let Some(Ok(Some(status))) = node.child.as_mut().map(|c| c.try_wait()) {
                node.note = format!("exited ({status})");
                let path = work.join(format!("{}.log", node.id));
                log.push((
                    started.elapsed(),
                    format!(
                        "{} exited unexpectedly with {status}; see {}",
                        node.id,
                        path.display()
                    ),
                ));
            }
        }
        announced = announce_moves(&runs, announced, t0, &mut log);
        if plain {
            for (at, line) in &log[printed..] {
                println!("[{:>6.2}s] {line}", at.as_secs_f64());
            }
            printed = log.len();
        } else {
            draw(&nodes, &owners, args, started, duration, &log);
        }
    }

    // End: stop the survivors gracefully, then read the final records.
    for node in &mut nodes {
        if let Some(child) = node.child.as_mut() {
            drop(child.stdin.take());
        }
    }
    for node in &mut nodes {
        if let Some(mut child) = node.child.take() {
            match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
                Ok(Ok(status)) if !status.success() && !staged.killed.contains_key(&node.id) => {
                    log.push((
                        started.elapsed(),
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
                        started.elapsed(),
                        format!("{} did not stop within 10 s and was killed", node.id),
                    ));
                }
            }
        }
    }
    let mut runs = read_runs(&records)?;
    close_killed(&mut runs, &staged.killed);
    announce_moves(&runs, announced, t0, &mut log);
    if plain {
        for (at, line) in &log[printed..] {
            println!("[{:>6.2}s] {line}", at.as_secs_f64());
        }
    }
    let found = overlaps(&runs);
    for (a, b) in &found {
        println!(
            "OVERLAP: {} ran on {} and {} at once",
            a.shard, a.node, b.node
        );
    }
    println!("{}", summary(&runs, &staged, found.len()));
    if args.keep {
        println!(
            "node logs, records and the lock directory are in {}",
            work.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(if found.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[allow(clippy::too_many_arguments)]
fn spawn_node(
    exe: &Path,
    work: &Path,
    driver_args: &[std::ffi::OsString],
    schema: &str,
    records: &Path,
    checkpoints: &Path,
    id: &str,
    shards: usize,
) -> Result<Child> {
    let log_path = work.join(format!("{id}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let log2 = log.try_clone().context("node log")?;
    let mut cmd = Command::new(exe);
    cmd.arg("node")
        .args(driver_args)
        .args([
            "--schema",
            schema,
            "--shards",
            &shards.to_string(),
            "--node-id",
            id,
        ])
        .args([
            "--poll-ms",
            "500",
            "--pause-ms",
            "200",
            "--loss-timeout-ms",
            "500",
            "--stop-timeout-ms",
            "500",
        ])
        .arg("--records")
        .arg(records)
        .arg("--checkpoints")
        .arg(checkpoints)
        .arg("--stop-on-stdin-eof")
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .kill_on_drop(true);
    cmd.spawn().with_context(|| format!("starting {id}"))
}

/// Shard → node running it now.
fn current_owners(runs: &[Run]) -> BTreeMap<String, (String, u128)> {
    runs.iter()
        .filter(|r| r.stop.is_none())
        .map(|r| (r.shard.clone(), (r.node.clone(), r.start)))
        .collect()
}

fn owned_by(owners: &BTreeMap<String, (String, u128)>, node: &str) -> usize {
    owners.values().filter(|(n, _)| n == node).count()
}

fn busiest<'a>(
    nodes: &'a mut [Node],
    owners: &BTreeMap<String, (String, u128)>,
) -> Option<&'a mut Node> {
    // A node that runs nothing would hand nothing over: wait for the next
    // tick instead (e.g. while a takeover is still under way).
    nodes
        .iter_mut()
        .filter(|n| n.note == "running" && owned_by(owners, &n.id) > 0)
        .max_by_key(|n| owned_by(owners, &n.id))
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

fn draw(
    nodes: &[Node],
    owners: &BTreeMap<String, (String, u128)>,
    args: &DemoArgs,
    started: Instant,
    duration: Duration,
    log: &[(Duration, String)],
) {
    let now = now_ns();
    Screen {
        title: format!(
            "shardlock demo: {} node processes, {} shards   t = {:.1}s / {}s",
            args.nodes,
            args.shards,
            started.elapsed().as_secs_f64(),
            duration.as_secs()
        ),
        shards: crate::node::shard_names(args.shards)
            .iter()
            .map(|shard| {
                let owner = owners
                    .get(shard.as_str())
                    .map(|(node, since)| (node.clone(), now.saturating_sub(*since) as f64 / 1e9));
                (shard.to_string(), owner)
            })
            .collect(),
        nodes: nodes
            .iter()
            .map(|n| (n.id.clone(), owned_by(owners, &n.id), n.note.as_str()))
            .collect(),
        note: String::new(),
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

/// Takeover times per staged event, from the nodes' records.
fn summary(runs: &[Run], staged: &Staged, overlap_count: usize) -> String {
    let mut out = String::from("\nsummary (from the nodes' own records)\n");
    let takeovers = |node: &str, at: u128| -> Vec<Duration> {
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
    };
    match staged.killed.iter().next() {
        Some((node, at)) => {
            let _ = writeln!(
                out,
                "  kill -9 of {node} (time from kill to new owner): {}",
                percentiles(&mut takeovers(node, *at))
            );
        }
        None => out.push_str("  kill -9: did not happen (the demo ended first)\n"),
    }
    match &staged.stopped {
        Some((node, at)) => {
            let _ = writeln!(
                out,
                "  graceful stop of {node} (time from stop to new owner): {}",
                percentiles(&mut takeovers(node, *at))
            );
        }
        None => out.push_str("  graceful stop: did not happen (the demo ended first)\n"),
    }
    let _ = write!(out, "overlaps: {overlap_count}");
    out
}
