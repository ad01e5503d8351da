//! Records which node runs which shard when, to prove no overlap.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shardlock_core::{Agent, AgentContext, AgentError, DatabaseId, NodeId, ShardId};

/// One agent run.
#[derive(Debug, Clone)]
pub struct ShardRun {
    /// The node that ran it.
    pub node: NodeId,
    /// The database.
    pub database: DatabaseId,
    /// The shard.
    pub shard: ShardId,
    /// When the agent started.
    pub started: Instant,
    /// When it stopped (`None` while running).
    pub stopped: Option<Instant>,
}

#[derive(Default)]
struct State {
    runs: Vec<ShardRun>,
    overlaps: u64,
    failures_left: HashMap<ShardId, u32>,
}

/// Shared record of agent runs. Clones share the record.
#[derive(Clone, Default)]
pub struct Recorder(Arc<Mutex<State>>);

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("Recorder")
            .field("runs", &s.runs.len())
            .field("overlaps", &s.overlaps)
            .finish()
    }
}

impl Recorder {
    /// An empty record.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `shard` started on `node`; the returned guard marks it stopped
    /// when dropped (also when the agent is aborted). Counts an overlap if
    /// another node runs the same shard of the same database right now.
    pub fn start(&self, node: &NodeId, database: &DatabaseId, shard: &ShardId) -> RunGuard {
        let mut s = self.lock();
        let clash = s.runs.iter().any(|r| {
            r.stopped.is_none() && &r.shard == shard && &r.database == database && &r.node != node
        });
        if clash {
            s.overlaps += 1;
            eprintln!("OVERLAP: {shard} of {database} started on {node} while running elsewhere");
        }
        s.runs.push(ShardRun {
            node: node.clone(),
            database: database.clone(),
            shard: shard.clone(),
            started: Instant::now(),
            stopped: None,
        });
        RunGuard {
            recorder: self.clone(),
            index: s.runs.len() - 1,
        }
    }

    /// Instants where two nodes ran the same shard.
    pub fn overlaps(&self) -> u64 {
        self.lock().overlaps
    }

    /// Every run so far.
    pub fn runs(&self) -> Vec<ShardRun> {
        self.lock().runs.clone()
    }

    /// The nodes running each shard now, by `(database, shard)`.
    pub fn running(&self) -> HashMap<(DatabaseId, ShardId), Vec<NodeId>> {
        let mut out: HashMap<(DatabaseId, ShardId), Vec<NodeId>> = HashMap::new();
        for r in self.lock().runs.iter().filter(|r| r.stopped.is_none()) {
            out.entry((r.database.clone(), r.shard.clone()))
                .or_default()
                .push(r.node.clone());
        }
        out
    }

    /// Number of runs of `node` still going.
    pub fn running_on(&self, node: &NodeId) -> usize {
        self.lock()
            .runs
            .iter()
            .filter(|r| r.stopped.is_none() && &r.node == node)
            .count()
    }

    /// Makes the next `times` runs of `shard` fail (odd ones return an error,
    /// even ones panic) shortly after starting.
    pub fn fail_next(&self, shard: &ShardId, times: u32) {
        self.lock().failures_left.insert(shard.clone(), times);
    }

    fn take_failure(&self, shard: &ShardId) -> Option<u32> {
        let mut s = self.lock();
        let left = s.failures_left.get_mut(shard)?;
        if *left == 0 {
            return None;
        }
        *left -= 1;
        Some(*left)
    }

    /// Waits until `done` holds for the record, or `within` passes. Returns
    /// whether it held.
    pub async fn wait_for(
        &self,
        within: Duration,
        mut done: impl FnMut(&Recorder) -> bool,
    ) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if done(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Marks a run stopped on drop.
#[derive(Debug)]
pub struct RunGuard {
    recorder: Recorder,
    index: usize,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        let mut s = self.recorder.lock();
        if let Some(run) = s.runs.get_mut(self.index) {
            run.stopped = Some(Instant::now());
        }
    }
}

/// An agent that records its runs and waits for cancellation.
#[derive(Debug, Clone)]
pub struct RecordingAgent {
    recorder: Recorder,
}

impl RecordingAgent {
    /// An agent recording into `recorder`.
    pub fn new(recorder: Recorder) -> Self {
        Self { recorder }
    }
}

impl Agent for RecordingAgent {
    async fn run(&self, shard: &ShardId, ctx: AgentContext) -> Result<(), AgentError> {
        let _run = self.recorder.start(&ctx.node, &ctx.database, shard);
        if let Some(left) = self.recorder.take_failure(shard) {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if left % 2 == 0 {
                panic!("injected panic in {shard} (expected: the test checks the restart)");
            }
            return Err(format!("injected failure in {shard}").into());
        }
        ctx.cancel.cancelled().await;
        Ok(())
    }
}
