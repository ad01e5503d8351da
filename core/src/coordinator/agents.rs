//! Running, supervising and stopping the agents of one lock set.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::CoordinatorConfig;
use crate::agent::{Agent, AgentContext, AgentError};
use crate::ids::ShardId;
use crate::lock_set::LockSet;

/// An agent that ran this long without failing has its failure count reset.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

enum SlotState {
    /// Recorded, not spawned yet: [`SetAgents::launch`] spawns it, and it
    /// runs the agent from `start_at` (the grant plus the takeover delay).
    Pending {
        start_at: Instant,
    },
    Running {
        cancel: CancellationToken,
        task: JoinHandle<Result<(), AgentError>>,
        started: Instant,
    },
    Waiting {
        restart_at: Instant,
    },
}

struct Slot {
    state: SlotState,
    failures: u32,
}

/// The agents of one owned set, one per shard.
pub(super) struct SetAgents {
    /// By shard, sorted, each shard once (usually one: a `Vec` costs no
    /// tree node per set).
    slots: Vec<(ShardId, Slot)>,
    /// Parent of every agent's token: cancelling it stops them all.
    cancel: SetToken,
    /// Agents recorded but not spawned yet.
    pending: usize,
}

/// A set's token, made when its agents are first spawned: a grant only
/// records the parent, so a cycle winning 10,000 sets makes no token (an
/// allocation and a lock of the parent each) before it is published.
struct SetToken {
    /// The parent the set's token descends from (the session's loss token).
    parent: CancellationToken,
    /// The set's own token, once made.
    own: Option<CancellationToken>,
}

impl SetToken {
    /// The set's token, made now if it was not yet (a child of a parent
    /// already cancelled is born cancelled: its agents never run).
    fn get(&mut self) -> &CancellationToken {
        self.own.get_or_insert_with(|| self.parent.child_token())
    }

    /// Cancels the set's token (never the parent); one not made yet is
    /// made cancelled, so no agent of the set runs after this.
    fn cancel(&mut self) {
        self.own.get_or_insert_with(CancellationToken::new).cancel();
    }
}

/// Set when an agent's task ends (returned, failed, panicked, cancelled or
/// aborted), so the coordinator walks its sets' agents only when there is
/// something to supervise, not every cycle.
#[derive(Clone, Default)]
pub(super) struct Ended(Arc<AtomicBool>);

impl Ended {
    /// Whether an agent ended since the last call; clears the mark.
    pub(super) fn take(&self) -> bool {
        self.0.swap(false, Ordering::AcqRel)
    }
}

/// Marks [`Ended`] when the task holding it finishes or is dropped.
struct MarkEnded(Ended);

impl Drop for MarkEnded {
    fn drop(&mut self) {
        (self.0).0.store(true, Ordering::Release);
    }
}

/// What one [`SetAgents::supervise`] call saw.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Supervised {
    /// Agents waiting for their restart.
    pub(super) waiting: usize,
    /// Agents found ended (failed, or returned before being cancelled).
    pub(super) failed: usize,
    /// Agents restarted.
    pub(super) restarted: usize,
}

impl SetAgents {
    /// Records one agent per shard of `set`, each to run the agent from
    /// `start_at` (the grant plus the takeover delay; the grant itself for
    /// sets that need none). Nothing
    /// is spawned until [`launch`](Self::launch), so a cycle that wins
    /// 10,000 sets can start their agents in bounded batches.
    ///
    /// The agents' tokens are children of `parent`: for an exclusive set the
    /// session's loss token, so the agents are cancelled the instant the
    /// driver signals the loss, before the coordinator even wakes up; one
    /// not spawned yet then never is.
    pub(super) fn new(set: &LockSet, parent: &CancellationToken, start_at: Instant) -> Self {
        let cancel = SetToken {
            parent: parent.clone(),
            own: None,
        };
        let mut slots: Vec<(ShardId, Slot)> = set
            .shards
            .iter()
            .map(|shard| {
                let state = SlotState::Pending { start_at };
                (shard.clone(), Slot { state, failures: 0 })
            })
            .collect();
        if slots.len() > 1 {
            slots.sort_by(|a, b| a.0.cmp(&b.0));
            slots.dedup_by(|a, b| a.0 == b.0);
        }
        let pending = slots.len();
        Self {
            slots,
            cancel,
            pending,
        }
    }

    /// Spawns pending agents, one unit of `budget` each, while the budget
    /// lasts. Answers whether none is left pending. The set's token is not
    /// asked (that takes its lock, 10,000 times for 10,000 new sets): an
    /// agent spawned under a cancelled token returns before running the
    /// agent (see `spawn`).
    pub(super) fn launch<A: Agent>(
        &mut self,
        agent: &Arc<A>,
        set: &LockSet,
        epoch: u64,
        config: &CoordinatorConfig,
        ended: &Ended,
        budget: &mut usize,
    ) -> bool {
        if self.pending == 0 {
            return true;
        }
        // The only agent of a set may use the set's own token (cancelling
        // the set cancels exactly it); a restart gets a child token.
        let only = self.slots.len() == 1;
        let cancel = self.cancel.get();
        for (shard, slot) in &mut self.slots {
            if *budget == 0 {
                return false;
            }
            if let SlotState::Pending { start_at } = slot.state {
                let token = if only {
                    cancel.clone()
                } else {
                    cancel.child_token()
                };
                slot.state = spawn(
                    agent,
                    set,
                    shard,
                    epoch,
                    config,
                    token,
                    Some(start_at),
                    ended,
                );
                self.pending -= 1;
                *budget -= 1;
            }
        }
        true
    }

    /// Restarts agents that ended on their own, with exponential backoff.
    /// Answers how many are waiting for a restart, and how many failed and
    /// restarted in this call.
    pub(super) fn supervise<A: Agent>(
        &mut self,
        agent: &Arc<A>,
        set: &LockSet,
        epoch: u64,
        config: &CoordinatorConfig,
        ended: &Ended,
    ) -> Supervised {
        let now = Instant::now();
        let mut out = Supervised::default();
        for (shard, slot) in &mut self.slots {
            if let SlotState::Running { task, started, .. } = &mut slot.state {
                // A long healthy run forgets earlier failures (checked here,
                // when the agent ended, as supervision runs only then).
                if started.elapsed() >= HEALTHY_RUN {
                    slot.failures = 0;
                }
                if !task.is_finished() {
                    continue;
                }
                let outcome = finished_outcome(task);
                out.failed += 1;
                slot.failures = slot.failures.saturating_add(1);
                let delay = config.backoff(config.restart_backoff, slot.failures - 1);
                match outcome {
                    Ok(()) => {
                        warn!(%shard, key = %set.key, ?delay, "agent returned before it was cancelled; restarting")
                    }
                    Err(reason) => {
                        error!(%shard, key = %set.key, failures = slot.failures, ?delay, error = %reason, "agent failed; restarting with backoff")
                    }
                }
                slot.state = SlotState::Waiting {
                    restart_at: now + delay,
                };
            }
            if let SlotState::Waiting { restart_at } = slot.state {
                if restart_at <= now {
                    info!(%shard, key = %set.key, failures = slot.failures, "agent restarted");
                    out.restarted += 1;
                    let token = self.cancel.get().child_token();
                    slot.state = spawn(agent, set, shard, epoch, config, token, None, ended);
                } else {
                    out.waiting += 1;
                }
            }
        }
        out
    }

    /// Cancels every agent without waiting (the first half of [`stop_all`]).
    pub(super) fn cancel(&mut self) {
        self.cancel.cancel();
    }

    /// Awaits every agent until `deadline`, then aborts (and awaits) the rest.
    async fn join(mut self, deadline: Instant) {
        for (shard, slot) in std::mem::take(&mut self.slots) {
            if let SlotState::Running { mut task, .. } = slot.state {
                match tokio::time::timeout_at(deadline, &mut task).await {
                    Ok(Ok(Ok(()))) | Ok(Err(_)) => {}
                    Ok(Ok(Err(e))) => warn!(%shard, error = %e, "agent failed while stopping"),
                    Err(_) => {
                        warn!(%shard, "agent did not stop within the stop timeout; aborting it");
                        task.abort();
                        let _ = task.await;
                    }
                }
            }
        }
    }
}

/// Stops many sets' agents together: cancels all, then awaits all under one
/// shared stop timeout. Returns only when no agent of these sets runs.
pub(super) async fn stop_all(mut sets: Vec<SetAgents>, stop_timeout: Duration) {
    for set in &mut sets {
        set.cancel();
    }
    let deadline = Instant::now() + stop_timeout;
    for set in sets {
        set.join(deadline).await;
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn<A: Agent>(
    agent: &Arc<A>,
    set: &LockSet,
    shard: &ShardId,
    epoch: u64,
    config: &CoordinatorConfig,
    cancel: CancellationToken,
    start_at: Option<Instant>,
    ended: &Ended,
) -> SlotState {
    let ctx = AgentContext {
        cancel: cancel.clone(),
        epoch,
        database: set.database.clone(),
        lock: set.key.clone(),
        node: config.node_id.clone(),
    };
    let agent = Arc::clone(agent);
    let shard = shard.clone();
    let ended = MarkEnded(ended.clone());
    let task = tokio::spawn(async move {
        let _ended = ended;
        if ctx.cancel.is_cancelled() {
            // The set was stopped (or its session lost) before its agents
            // were spawned: the agent never runs.
            return Ok(());
        }
        if let Some(start_at) = start_at.filter(|at| *at > Instant::now()) {
            // Lock-delay: whoever held the key before may not have noticed
            // its loss yet; give it the driver's detection bound to stop.
            tokio::select! {
                _ = ctx.cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep_until(start_at) => {}
            }
        }
        agent.run(&shard, ctx).await
    });
    SlotState::Running {
        cancel,
        task,
        started: Instant::now(),
    }
}

/// The outcome of a finished task, without blocking.
fn finished_outcome(task: &mut JoinHandle<Result<(), AgentError>>) -> Result<(), String> {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    match std::pin::Pin::new(task).poll(&mut cx) {
        std::task::Poll::Ready(Ok(Ok(()))) => Ok(()),
        std::task::Poll::Ready(Ok(Err(e))) => Err(e.to_string()),
        std::task::Poll::Ready(Err(e)) if e.is_panic() => {
            Err(format!("agent panicked: {}", panic_message(e)))
        }
        std::task::Poll::Ready(Err(e)) => Err(e.to_string()),
        std::task::Poll::Pending => Err("BUG: agent task polled before it finished".into()),
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    super::cycle::panic_text(e.into_panic().as_ref())
}

// `Future::poll` needs the trait in scope.
use std::future::Future as _;

impl Drop for SetAgents {
    /// A safety net: agents never outlive the record of them.
    fn drop(&mut self) {
        // Never the parent: that is the session's loss token.
        if let Some(token) = &self.cancel.own {
            token.cancel();
        }
        for (_, slot) in &self.slots {
            if let SlotState::Running { task, cancel, .. } = &slot.state {
                cancel.cancel();
                task.abort();
            }
        }
    }
}
