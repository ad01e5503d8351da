//! Agents: the user code that runs one shard while its lock is held.

use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::error::BoxError;
use crate::ids::{DatabaseId, NodeId, ShardId};
use crate::key::LockKey;

/// What an agent's failure is: any error.
pub type AgentError = BoxError;

/// Everything an agent gets besides its shard.
#[derive(Debug, Clone)]
pub struct AgentContext {
    /// Fires when the agent must stop: the lock is lost, the set left the
    /// distribution, or the node is stopping. Stop promptly; an agent that
    /// does not end within the coordinator's stop timeout is aborted.
    pub cancel: CancellationToken,
    /// Counts this node's acquisitions of the lock, starting at 1; a new value
    /// means the lock was lost or released in between. For fencing across
    /// nodes use a checkpoint store's durable epoch.
    pub epoch: u64,
    /// The database the lock lives in (the tenant, for multi-tenant sets).
    pub database: DatabaseId,
    /// The key that guards this shard.
    pub lock: LockKey,
    /// The node running the agent.
    pub node: NodeId,
}

/// Runs one shard until cancelled.
///
/// One agent value serves every shard; it is shared between tasks.
///
/// ```
/// use shardlock_core::{Agent, AgentContext, AgentError, ShardId};
///
/// struct Ticker;
///
/// impl Agent for Ticker {
///     async fn run(&self, shard: &ShardId, ctx: AgentContext) -> Result<(), AgentError> {
///         loop {
///             tokio::select! {
///                 _ = ctx.cancel.cancelled() => return Ok(()),
///                 _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {
///                     println!("{shard} tick on {}", ctx.node);
///                 }
///             }
///         }
///     }
/// }
/// # fn assert_agent<A: Agent>(_: A) {}
/// # assert_agent(Ticker);
/// ```
pub trait Agent: Send + Sync + 'static {
    /// Runs `shard` until `ctx.cancel` fires. Returning an error (or
    /// panicking) makes the coordinator restart the agent with exponential
    /// backoff while the lock is still held.
    fn run(
        &self,
        shard: &ShardId,
        ctx: AgentContext,
    ) -> impl Future<Output = Result<(), AgentError>> + Send;
}

impl<A: Agent> Agent for Arc<A> {
    fn run(
        &self,
        shard: &ShardId,
        ctx: AgentContext,
    ) -> impl Future<Output = Result<(), AgentError>> + Send {
        (**self).run(shard, ctx)
    }
}
