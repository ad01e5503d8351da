//! What each node process writes about its own agent runs, and the reader
//! the demo uses to prove no shard ever ran on two nodes at once.
//!
//! One file per node, `<records>/<node>.log`, lines `<event> <shard> <ns>`
//! (nanoseconds since the Unix epoch, one host's clock), optionally followed
//! by `key=value` fields:
//!
//! - `start <shard> <ns> epoch=<n>`: an agent run began;
//! - `cancel <shard> <ns>`: the agent saw its cancellation (lock lost, set
//!   moved, node stopping);
//! - `stop <shard> <ns>`: the agent returned; the run is over;
//! - `config - <ns> pid=.. poll_ms=.. loss_timeout_ms=.. stop_timeout_ms=..
//!   takeover_delay_ms=.. distributor=.. [group=.. weight=.. max_members=..]`:
//!   the node's settings, once at start;
//! - `assignment - <ns> sets=<n> shards=<n> members=<n> share=<n|-> moves=<n>
//!   wakeups=<n> lost=<n>`: the node's assignment (see
//!   `shardlock::Assignment`) whenever one of these changed: the sets it
//!   holds, the live member slots it saw and its fair share (balanced
//!   distributor; `members=0 share=-` without), the sets it gave back to
//!   rebalance and the release announcements that woke it (both since
//!   start), and its sessions lost.
//!
//! A node killed with SIGKILL writes no `stop`: its open runs end at the kill.
//! Readers ignore events and fields they do not know.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// Nanoseconds since the Unix epoch.
pub(crate) fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Appends this node's records; clones share the file.
#[derive(Debug, Clone)]
pub(crate) struct RecordWriter(Arc<Mutex<File>>);

impl RecordWriter {
    pub(crate) fn create(dir: &Path, node: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{node}.log"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self(Arc::new(Mutex::new(file))))
    }

    pub(crate) fn write(&self, event: &str, shard: &str) {
        self.write_with(event, shard, "");
    }

    /// Writes one record with extra `key=value` fields after the time.
    pub(crate) fn write_with(&self, event: &str, shard: &str, fields: &str) {
        let line = if fields.is_empty() {
            format!("{event} {shard} {}\n", now_ns())
        } else {
            format!("{event} {shard} {} {fields}\n", now_ns())
        };
        let mut file = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = file.write_all(line.as_bytes()).and_then(|()| file.flush()) {
            tracing::warn!(error = %e, "cannot write a run record");
        }
    }
}

/// One agent run read back from the records.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    pub(crate) node: String,
    pub(crate) shard: String,
    pub(crate) start: u128,
    pub(crate) stop: Option<u128>,
}

/// A node's latest `assignment` record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct AssignmentRecord {
    pub(crate) at: u128,
    pub(crate) sets: usize,
    pub(crate) members: usize,
    pub(crate) share: Option<usize>,
    pub(crate) moves: u64,
    pub(crate) wakeups: u64,
}

impl AssignmentRecord {
    /// The record's `key=value` fields.
    pub(crate) fn fields(a: &shardlock::Assignment) -> String {
        format!(
            "sets={} shards={} members={} share={} moves={} wakeups={} lost={}",
            a.owned.len(),
            a.shard_count(),
            a.members,
            a.share.map_or_else(|| "-".to_string(), |s| s.to_string()),
            a.moves,
            a.wakeups,
            a.sessions_lost
        )
    }

    fn parse<'a>(at: u128, fields: impl Iterator<Item = &'a str>) -> Self {
        let mut out = Self {
            at,
            ..Self::default()
        };
        for (k, v) in fields.filter_map(|kv| kv.split_once('=')) {
            match k {
                "sets" => out.sets = v.parse().unwrap_or(0),
                "members" => out.members = v.parse().unwrap_or(0),
                "share" => out.share = v.parse().ok(),
                "moves" => out.moves = v.parse().unwrap_or(0),
                "wakeups" => out.wakeups = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        out
    }
}

/// Everything the nodes in a records folder wrote.
#[derive(Debug, Clone, Default)]
pub(crate) struct Records {
    pub(crate) runs: Vec<Run>,
    /// Each node's latest assignment record.
    pub(crate) assignments: BTreeMap<String, AssignmentRecord>,
}

/// Reads every node's records in `dir`.
pub(crate) fn read(dir: &Path) -> Result<Records> {
    let mut out = Records::default();
    let runs = &mut out.runs;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    for path in files {
        let Some(node) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut open: BTreeMap<String, usize> = BTreeMap::new();
        for line in text.lines() {
            let mut parts = line.split(' ');
            let (Some(event), Some(shard), Some(ns)) = (parts.next(), parts.next(), parts.next())
            else {
                continue; // a half-written last line of a killed node
            };
            let Ok(ns) = ns.parse::<u128>() else { continue };
            match event {
                "start" => {
                    open.insert(shard.to_string(), runs.len());
                    runs.push(Run {
                        node: node.clone(),
                        shard: shard.to_string(),
                        start: ns,
                        stop: None,
                    });
                }
                "stop" => {
                    if let Some(i) = open.remove(shard) {
                        runs[i].stop = Some(ns);
                    }
                }
                "assignment" => {
                    out.assignments
                        .insert(node.clone(), AssignmentRecord::parse(ns, parts.by_ref()));
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

/// Closes the open runs of nodes that died, at the instant they died.
pub(crate) fn close_killed(runs: &mut [Run], killed: &BTreeMap<String, u128>) {
    for run in runs.iter_mut().filter(|r| r.stop.is_none()) {
        if let Some(at) = killed.get(&run.node) {
            run.stop = Some(*at);
        }
    }
}

/// Pairs of runs of one shard on two nodes whose intervals intersect.
pub(crate) fn overlaps(runs: &[Run]) -> Vec<(Run, Run)> {
    let mut out = Vec::new();
    for (i, a) in runs.iter().enumerate() {
        for b in &runs[i + 1..] {
            if a.shard != b.shard || a.node == b.node {
                continue;
            }
            let a_end = a.stop.unwrap_or(u128::MAX);
            let b_end = b.stop.unwrap_or(u128::MAX);
            if a.start < b_end && b.start < a_end {
                out.push((a.clone(), b.clone()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(node: &str, shard: &str, start: u128, stop: Option<u128>) -> Run {
        Run {
            node: node.into(),
            shard: shard.into(),
            start,
            stop,
        }
    }

    #[test]
    fn overlap_needs_two_nodes_and_intersecting_intervals() {
        let runs = vec![
            run("a", "s1", 0, Some(10)),
            run("b", "s1", 10, Some(20)), // touches, no overlap
            run("c", "s1", 15, None),     // overlaps b
            run("a", "s2", 0, None),
            run("a", "s2", 5, None), // same node: not an overlap
        ];
        let found = overlaps(&runs);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].0.node.as_str(), found[0].1.node.as_str()),
            ("b", "c")
        );
    }

    #[test]
    fn records_round_trip_and_killed_runs_close_at_the_kill() {
        let dir = std::env::temp_dir().join(format!("shardlock-records-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let w = RecordWriter::create(&dir, "n1").unwrap();
        w.write_with("start", "s1", "epoch=1");
        w.write("cancel", "s1");
        w.write("stop", "s1");
        w.write("start", "s2");
        w.write_with(
            "assignment",
            "-",
            "sets=4 shards=4 members=3 share=4 moves=2 wakeups=1 lost=0",
        );
        w.write_with(
            "assignment",
            "-",
            "sets=6 shards=6 members=2 share=6 moves=2 wakeups=3 lost=0",
        );
        std::fs::write(
            dir.join("n2.log"),
            "assignment - 3 sets=1 members=0 share=-\nstart s1 5\nstart s9",
        )
        .unwrap();
        let records = read(&dir).unwrap();
        let latest = &records.assignments["n1"];
        assert_eq!(
            (
                latest.sets,
                latest.members,
                latest.share,
                latest.moves,
                latest.wakeups
            ),
            (6, 2, Some(6), 2, 3),
            "the latest assignment record wins"
        );
        let n2 = &records.assignments["n2"];
        assert_eq!((n2.sets, n2.share), (1, None), "no share without balancing");
        let mut runs = records.runs;
        assert_eq!(runs.len(), 3, "{runs:?}");
        assert!(runs
            .iter()
            .any(|r| r.node == "n1" && r.shard == "s1" && r.stop.is_some()));
        close_killed(&mut runs, &BTreeMap::from([("n2".to_string(), 7u128)]));
        let n2 = runs.iter().find(|r| r.node == "n2").unwrap();
        assert_eq!(n2.stop, Some(7));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
