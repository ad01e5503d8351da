//! The projection runner as a coordinator [`Agent`]: one projection per
//! shard, moving between nodes with the shard's lock.

use std::fmt;

use super::{
    Checkpoint, CheckpointError, CheckpointStore, EventReader, Positioned, ProjectionOptions,
    ProjectionRunner, Projector, ProjectorCoordinator,
};
use crate::agent::{Agent, AgentContext, AgentError};
use crate::error::BoxError;
use crate::ids::ShardId;

/// A backend whose leadership is the coordinator's lock: inside an agent the
/// node already holds the shard's lock, so leadership is always granted and
/// fencing comes from the checkpoint epoch alone.
#[derive(Debug, Clone)]
pub struct CoordinatorLed<B>(pub B);

impl<B: EventReader> EventReader for CoordinatorLed<B> {
    type Event = B::Event;

    async fn read_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Positioned<Self::Event>>, BoxError> {
        self.0.read_after(after, limit).await
    }
}

impl<B: CheckpointStore> CheckpointStore for CoordinatorLed<B> {
    async fn claim(&self, subscription: &str) -> Result<Checkpoint, CheckpointError> {
        self.0.claim(subscription).await
    }

    async fn load(&self, subscription: &str) -> Result<Option<Checkpoint>, CheckpointError> {
        self.0.load(subscription).await
    }

    async fn save(
        &self,
        subscription: &str,
        epoch: i64,
        position: i64,
    ) -> Result<(), CheckpointError> {
        self.0.save(subscription, epoch, position).await
    }
}

impl<B: Send + Sync> ProjectorCoordinator for CoordinatorLed<B> {
    type Guard = ();

    async fn try_lead(&self, _projector: &str) -> Result<Option<()>, BoxError> {
        Ok(Some(()))
    }

    /// Granted at once, like [`try_lead`](Self::try_lead): the node already
    /// holds the shard's lock.
    async fn wait_lead(
        &self,
        _projector: &str,
        _cancel: &crate::CancellationToken,
    ) -> Result<Option<()>, BoxError> {
        Ok(Some(()))
    }
}

/// Runs one projection per shard: `make` builds the projector and its
/// backend for a shard (e.g. the tenant's event store for
/// `ctx.database`).
///
/// ```
/// # #![allow(dead_code)]
/// # use shardlock_core::*;
/// # fn demo<P, B>(projector_for: impl Fn(&ShardId) -> P + Send + Sync + 'static, backend: B)
/// # where P: Projector + 'static, B: EventReader<Event = P::Event> + CheckpointStore + Clone + Send + Sync + 'static {
/// let agent = ProjectionAgent::new(move |shard: &ShardId, _ctx: &AgentContext| {
///     Ok::<_, AgentError>((projector_for(shard), backend.clone()))
/// });
/// # let _ = agent;
/// # }
/// ```
pub struct ProjectionAgent<F> {
    make: F,
    options: ProjectionOptions,
}

impl<F> fmt::Debug for ProjectionAgent<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectionAgent")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<F> ProjectionAgent<F> {
    /// An agent building each shard's projection with `make`.
    pub fn new(make: F) -> Self {
        Self {
            make,
            options: ProjectionOptions::default(),
        }
    }

    /// Sets the runner options.
    pub fn options(mut self, options: ProjectionOptions) -> Self {
        self.options = options;
        self
    }
}

impl<F, P, B> Agent for ProjectionAgent<F>
where
    F: Fn(&ShardId, &AgentContext) -> Result<(P, B), AgentError> + Send + Sync + 'static,
    P: Projector + 'static,
    B: EventReader<Event = P::Event> + CheckpointStore + Send + Sync + 'static,
{
    async fn run(&self, shard: &ShardId, ctx: AgentContext) -> Result<(), AgentError> {
        let (projector, backend) = (self.make)(shard, &ctx)?;
        let led = CoordinatorLed(backend);
        ProjectionRunner::new(&projector, &led)
            .options(self.options.clone())
            .run(&ctx.cancel)
            .await
            .map_err(|e| Box::new(e) as AgentError)
    }
}
