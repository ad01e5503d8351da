//! The poll → apply → checkpoint loop.

use std::fmt;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    CheckpointError, CheckpointStore, DeadLetter, EventReader, Positioned, ProjectionError,
    ProjectionOptions, Projector, ProjectorCoordinator,
};
use crate::error::BoxError;
use crate::metrics::ProjectionMetrics;

/// Runs `projector` against `backend` until `cancel` fires, with default
/// options and no dead-letter hook.
///
/// # Semantics (at-least-once)
///
/// 1. Take leadership for the projector's name, else
///    [`ProjectionError::LeadershipError`] (or, with
///    [`ProjectionOptions::wait_for_leadership`], wait for it).
/// 2. [`CheckpointStore::claim`]: bump the subscription's fencing **epoch**
///    and load its position.
/// 3. Read a batch of events after the position; apply each in order; save
///    the checkpoint **after** applying, conditional on the epoch. A node
///    whose epoch was superseded (it lost its lock but kept running) gets
///    [`ProjectionError::FencedOff`] and stops; the checkpoint never moves
///    backwards.
/// 4. No events: wait with backoff. Cancellation stops the runner promptly
///    and releases leadership.
///
/// Events after the last saved checkpoint may be applied again after a
/// failover (at-least-once): make `apply` idempotent, or write the
/// projection's rows and the checkpoint in one transaction (SQL stores
/// offer that).
///
/// A failing event is retried with exponential backoff up to
/// [`ProjectionOptions::max_attempts`]; then, with a [`DeadLetter`] hook the
/// event is recorded and skipped, without one the runner stops with
/// [`ProjectionError::Apply`] and the checkpoint stays before the event.
///
/// # Errors
///
/// [`ProjectionError::LeadershipError`] when another node leads;
/// [`ProjectionError::FencedOff`] when superseded; [`ProjectionError::Apply`]
/// when an event keeps failing; [`ProjectionError::Store`] for I/O.
pub async fn run_projection<P, B>(
    projector: &P,
    backend: &B,
    cancel: &CancellationToken,
) -> Result<(), ProjectionError>
where
    P: Projector,
    B: EventReader<Event = P::Event> + CheckpointStore + ProjectorCoordinator,
{
    ProjectionRunner::new(projector, backend).run(cancel).await
}

/// The dead-letter hook of a runner without one.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDeadLetter;

impl<E: Sync> DeadLetter<E> for NoDeadLetter {
    async fn record(&self, _: &str, _: &Positioned<E>, _: &BoxError) -> Result<(), BoxError> {
        Err("no dead-letter hook".into())
    }
}

/// [`run_projection`] with options and an optional dead-letter hook.
pub struct ProjectionRunner<'a, P, B, D = NoDeadLetter> {
    projector: &'a P,
    backend: &'a B,
    options: ProjectionOptions,
    dead_letter: Option<D>,
}

impl<P, B, D> fmt::Debug for ProjectionRunner<'_, P, B, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectionRunner")
            .field("options", &self.options)
            .field("dead_letter", &self.dead_letter.is_some())
            .finish_non_exhaustive()
    }
}

impl<'a, P, B> ProjectionRunner<'a, P, B, NoDeadLetter>
where
    P: Projector,
    B: EventReader<Event = P::Event> + CheckpointStore + ProjectorCoordinator,
{
    /// A runner with default options and no dead-letter hook.
    pub fn new(projector: &'a P, backend: &'a B) -> Self {
        Self {
            projector,
            backend,
            options: ProjectionOptions::default(),
            dead_letter: None,
        }
    }
}

impl<'a, P, B, D> ProjectionRunner<'a, P, B, D>
where
    P: Projector,
    B: EventReader<Event = P::Event> + CheckpointStore + ProjectorCoordinator,
    D: DeadLetter<P::Event>,
{
    /// Sets the options.
    pub fn options(mut self, options: ProjectionOptions) -> Self {
        self.options = options;
        self
    }

    /// Records events that keep failing with `hook` and moves on past them.
    pub fn dead_letter<D2: DeadLetter<P::Event>>(self, hook: D2) -> ProjectionRunner<'a, P, B, D2> {
        ProjectionRunner {
            projector: self.projector,
            backend: self.backend,
            options: self.options,
            dead_letter: Some(hook),
        }
    }

    fn store_error(&self, what: &'static str, source: BoxError) -> ProjectionError {
        ProjectionError::Store {
            name: self.projector.name().to_string(),
            what,
            source,
        }
    }

    fn checkpoint_error(&self, e: CheckpointError) -> ProjectionError {
        match e {
            CheckpointError::Store(source) => self.store_error("checkpoint store", source),
            fenced @ CheckpointError::FencedOff { .. } => ProjectionError::FencedOff {
                name: self.projector.name().to_string(),
                source: fenced,
            },
            // `NotClaimed` cannot happen here (the runner claims first) unless
            // the row vanished meanwhile: the store's answer says which.
            other => self.store_error("checkpoint store", Box::new(other)),
        }
    }

    /// Leadership as the options ask: at once or waiting; `Ok(None)` when
    /// `cancel` fired while waiting.
    async fn take_leadership(
        &self,
        name: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<B::Guard>, ProjectionError> {
        if self.options.wait_for_leadership {
            debug!(projector = name, "waiting for leadership");
            return self
                .backend
                .wait_lead(name, cancel)
                .await
                .map_err(|e| self.store_error("leadership", e));
        }
        match self
            .backend
            .try_lead(name)
            .await
            .map_err(|e| self.store_error("leadership", e))?
        {
            Some(guard) => Ok(Some(guard)),
            None => Err(ProjectionError::LeadershipError {
                name: name.to_string(),
            }),
        }
    }

    /// Runs until `cancel` fires (then `Ok`) or an error stops it.
    /// Leadership is given up ([`ProjectorCoordinator::step_down`]) when
    /// this returns. With [`ProjectionOptions::wait_for_leadership`] it
    /// first waits for leadership; cancelled while waiting, it answers `Ok`
    /// without having led.
    ///
    /// # Cancel safety
    ///
    /// Cancelling through `cancel` finishes the current event and saves its
    /// checkpoint. Dropping the future may lose the checkpoint of events
    /// already applied (they are applied again: at-least-once); leadership
    /// is then given up by dropping its guard.
    pub async fn run(self, cancel: &CancellationToken) -> Result<(), ProjectionError> {
        let name = self.projector.name().to_string();
        let Some(guard) = self.take_leadership(&name, cancel).await? else {
            debug!(projector = %name, "cancelled while waiting for leadership");
            return Ok(());
        };
        let lost = B::lost(&guard).unwrap_or_default();
        // `stop` fires on the caller's cancel or on the loss of leadership;
        // `lead` checks it before every event.
        let stop = CancellationToken::new();
        let lead = async {
            let result = self.lead(&name, &stop).await;
            stop.cancel();
            result
        };
        let forward = async {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = lost.cancelled() => {}
                _ = stop.cancelled() => {}
            }
            stop.cancel();
        };
        let (result, ()) = tokio::join!(lead, forward);
        self.backend.step_down(guard).await;
        if lost.is_cancelled() && !cancel.is_cancelled() {
            tracing::warn!(projector = %name, "leadership lost: projection stopped");
            result?;
            return Err(ProjectionError::LeadershipLost { name });
        }
        result
    }

    async fn lead(&self, name: &str, cancel: &CancellationToken) -> Result<(), ProjectionError> {
        let claimed = self
            .backend
            .claim(name)
            .await
            .map_err(|e| self.checkpoint_error(e))?;
        let (epoch, mut position) = (claimed.epoch, claimed.position);
        info!(projector = name, epoch, position, "projection leading");
        let metrics = ProjectionMetrics::new(name);
        let mut idle = self.options.idle_backoff;
        while !cancel.is_cancelled() {
            let batch = tokio::select! {
                _ = cancel.cancelled() => break,
                batch = self.backend.read_after(position, self.options.batch_size) => {
                    batch.map_err(|e| self.store_error("reading events", e))?
                }
            };
            if batch.is_empty() {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(idle) => {}
                }
                idle = (idle * 2).min(self.options.max_idle);
                continue;
            }
            idle = self.options.idle_backoff;
            let before = position;
            let mut failure = None;
            for event in &batch {
                if cancel.is_cancelled() {
                    break;
                }
                match self.apply_with_retries(name, event, cancel, &metrics).await {
                    Ok(true) => position = event.position,
                    Ok(false) => break, // cancelled while retrying
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            if position > before {
                self.backend
                    .save(name, epoch, position)
                    .await
                    .map_err(|e| {
                        if matches!(e, CheckpointError::FencedOff { .. }) {
                            metrics.fenced();
                        }
                        self.checkpoint_error(e)
                    })?;
                debug!(projector = name, position, "checkpoint saved");
            }
            if let Some(e) = failure {
                return Err(e);
            }
        }
        info!(projector = name, position, "projection stopped");
        Ok(())
    }

    async fn apply_with_retries(
        &self,
        name: &str,
        event: &Positioned<P::Event>,
        cancel: &CancellationToken,
        metrics: &ProjectionMetrics,
    ) -> Result<bool, ProjectionError> {
        let mut delay = self.options.retry_backoff;
        let mut attempt = 1;
        loop {
            let error = match self.projector.apply(event).await {
                Ok(()) => {
                    metrics.applied(1);
                    return Ok(true);
                }
                Err(e) => e,
            };
            if cancel.is_cancelled() {
                return Ok(false);
            }
            if attempt >= self.options.max_attempts {
                return match &self.dead_letter {
                    Some(hook) => {
                        warn!(projector = name, position = event.position, error = %error, "event dead-lettered after {attempt} attempts");
                        hook.record(name, event, &error)
                            .await
                            .map(|()| {
                                metrics.dead_lettered();
                                true
                            })
                            .map_err(|e| self.store_error("dead-letter hook", e))
                    }
                    None => Err(ProjectionError::Apply {
                        name: name.to_string(),
                        position: event.position,
                        attempts: attempt,
                        source: error,
                    }),
                };
            }
            warn!(projector = name, position = event.position, attempt, error = %error, retry_in = ?delay, "event failed; retrying");
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(delay) => {}
            }
            delay *= 2;
            attempt += 1;
        }
    }
}
