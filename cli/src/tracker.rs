//! Watches which node runs which shard, counting overlaps and measuring
//! handovers, for the demo's table and summary.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shardlock::{Agent, AgentContext, AgentError, NodeId, ShardId};

#[derive(Debug, Default)]
struct State {
    /// Nodes running each shard now, with the start instant.
    running: BTreeMap<ShardId, Vec<(NodeId, Instant)>>,
    /// When each shard's last run stopped, and on which node.
    last_stop: BTreeMap<ShardId, (NodeId, Instant)>,
    overlaps: u64,
    /// Each move of a shard between nodes.
    moves: Vec<Move>,
    log: Vec<(Instant, String)>,
    /// When an agent last started or stopped.
    last_change: Option<Instant>,
}

/// A shard moving from one node to another.
#[derive(Debug, Clone)]
pub(crate) struct Move {
    pub(crate) from: NodeId,
    pub(crate) to: NodeId,
    /// When the new node started it.
    pub(crate) at: Instant,
    /// Time with nobody running it.
    pub(crate) gap: Duration,
}

/// Shared tracker; clones share state.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tracker(Arc<Mutex<State>>);

impl Tracker {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start(&self, node: &NodeId, shard: &ShardId) -> RunGuard {
        let now = Instant::now();
        let mut s = self.lock();
        let others = s
            .running
            .get(shard)
            .map(|r| r.iter().filter(|(n, _)| n != node).count())
            .unwrap_or(0);
        if others > 0 {
            s.overlaps += 1;
            s.log.push((
                now,
                format!("OVERLAP: {shard} started on {node} while running elsewhere"),
            ));
        }
        if let Some((from, stopped)) = s.last_stop.get(shard).cloned() {
            if &from != node {
                let gap = now.saturating_duration_since(stopped);
                s.log.push((
                    now,
                    format!(
                        "{shard} moved {from} -> {node} ({:.0} ms with no owner)",
                        gap.as_secs_f64() * 1e3
                    ),
                ));
                s.moves.push(Move {
                    from,
                    to: node.clone(),
                    at: now,
                    gap,
                });
            }
        }
        s.running
            .entry(shard.clone())
            .or_default()
            .push((node.clone(), now));
        s.last_change = Some(now);
        RunGuard {
            tracker: self.clone(),
            node: node.clone(),
            shard: shard.clone(),
        }
    }

    pub(crate) fn note(&self, text: String) {
        self.lock().log.push((Instant::now(), text));
    }

    pub(crate) fn overlaps(&self) -> u64 {
        self.lock().overlaps
    }

    /// When an agent last started or stopped anywhere.
    pub(crate) fn last_change(&self) -> Option<Instant> {
        self.lock().last_change
    }

    pub(crate) fn moves(&self) -> Vec<Move> {
        self.lock().moves.clone()
    }

    /// Owner(s) of each shard now.
    pub(crate) fn owners(&self) -> BTreeMap<ShardId, Vec<(NodeId, Instant)>> {
        self.lock().running.clone()
    }

    pub(crate) fn log_tail(&self, n: usize) -> Vec<(Instant, String)> {
        let s = self.lock();
        s.log.iter().rev().take(n).rev().cloned().collect()
    }

    pub(crate) fn log_since(&self, from: usize) -> (usize, Vec<(Instant, String)>) {
        let s = self.lock();
        (s.log.len(), s.log.iter().skip(from).cloned().collect())
    }
}

struct RunGuard {
    tracker: Tracker,
    node: NodeId,
    shard: ShardId,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut s = self.tracker.lock();
        if let Some(runs) = s.running.get_mut(&self.shard) {
            runs.retain(|(n, _)| n != &self.node);
            if runs.is_empty() {
                s.running.remove(&self.shard);
            }
        }
        s.last_stop
            .insert(self.shard.clone(), (self.node.clone(), now));
        s.last_change = Some(now);
    }
}

/// The demo's agent: "processes" its shard until cancelled, reporting to the
/// tracker.
#[derive(Debug, Clone)]
pub(crate) struct DemoAgent(pub(crate) Tracker);

impl Agent for DemoAgent {
    async fn run(&self, shard: &ShardId, ctx: AgentContext) -> Result<(), AgentError> {
        let _run = self.0.start(&ctx.node, shard);
        ctx.cancel.cancelled().await;
        Ok(())
    }
}
