//! `eventcore::run_projection`, stopped at once on a loss of leadership.

use eventcore::ProjectionConfig;
use eventcore_types::{Event, EventReader, Projector};
use shardlock_core::{CheckpointStore, Driver};
use tracing::warn;

use crate::backend::{ShardlockBackend, Stop};
use crate::error::RunError;
use crate::positions::PositionTable;

/// Runs `projector` with [`eventcore::run_projection`] on `backend`, and
/// stops it as soon as its leadership is lost or fenced off.
///
/// eventcore's runner has no cancellation and does not look at its guard
/// after taking it: on its own it only stops once the backend's reads fail
/// (see [`ShardlockBackend`]). This wrapper watches the leadership taken
/// for `projector.name()` and, when its session is lost or a save is fenced
/// off, drops the run at its next await point. eventcore awaits a
/// checkpoint save after every event and the backend yields there once it
/// knows, so at most the event being applied when the loss is seen is
/// applied after it (`Projector::apply` is synchronous and cannot be
/// interrupted). Dropping the run drops the guard, which releases the lock.
///
/// # Errors
///
/// [`RunError::LeadershipLost`] or [`RunError::FencedOff`] when stopped as
/// above; [`RunError::Projection`] for eventcore's own errors, among them
/// `LeadershipError` when another node leads (try again later).
pub async fn run_projection<Pr, R, D, S, P>(
    projector: Pr,
    backend: &ShardlockBackend<R, D, S, P>,
    config: ProjectionConfig,
) -> Result<(), RunError>
where
    Pr: Projector,
    Pr::Event: Event + Clone,
    Pr::Context: Default,
    Pr::Error: std::fmt::Debug,
    R: EventReader + Send + Sync,
    R::Error: std::error::Error + Send + Sync + 'static,
    D: Driver,
    S: CheckpointStore,
    P: PositionTable,
{
    let name = projector.name().to_string();
    let from = backend.next_lease_id();
    let run = eventcore::run_projection(projector, backend, config);
    tokio::select! {
        biased;
        stop = backend.stopped(&name, from) => {
            warn!(projector = %name, ?stop, "eventcore projection stopped: leadership gone");
            Err(match stop {
                Stop::Lost => RunError::LeadershipLost { name },
                Stop::Fenced(_) => RunError::FencedOff { name },
            })
        }
        result = run => result.map_err(RunError::from),
    }
}
