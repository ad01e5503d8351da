//! The driver contract: what every database backend provides.
//!
//! A [`Driver`] opens [`Session`]s; a session is **one dedicated connection to
//! one database** (never a pooled one: a session lock belongs to the
//! connection that took it). The contract suite in `shardlock-contract-tests`
//! checks every clause below against every driver.
//!
//! 1. At most one session holds a key at any instant.
//! 2. [`Session::try_acquire`] never waits and is idempotent: a key the
//!    session already holds answers `true` without stacking a second hold.
//! 3. A batch of keys is answered in one round trip.
//! 4. [`Session::acquire`] waits without polling where the database can block,
//!    and is cancel-safe: a cancelled wait leaves no lock held.
//! 5. [`Session::release`] frees a held key at once; releasing a key not held
//!    answers `false`.
//! 6. Closing or dropping the session releases every key; drop never blocks
//!    and works on a current-thread runtime.
//! 7. Distinct keys are independent.
//! 8. [`Session::verify`] fails when the connection is gone or the database no
//!    longer shows the session's locks; and loss is signalled as it happens:
//!    [`Session::signals`]' `lost` token fires when the driver sees the
//!    connection end, without waiting for a statement, within the bound the
//!    driver states in [`Driver::capabilities`].
//! 9. A crashed process's keys are released by the database.
//! 10. Errors are typed; "not granted" is a value.
//! 11. [`Session::probe`] tells which keys another session holds and leaves
//!     every key as it found it (the default takes and gives back; a driver
//!     that can look without locking overrides it).
//! 12. [`Session::release_announced`] releases like
//!     [`Session::release_many`]; where the driver offers release hints
//!     ([`Capabilities::release_hint`]), every other session of the database
//!     learns of it through its [`ReleaseHints`](crate::ReleaseHints), with
//!     the keys handed over cleanly marked.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::holds::Holds;
use crate::ids::{DatabaseId, NodeId};
use crate::key::LockKey;
use crate::signals::SessionSignals;

/// Whether a driver offers a feature, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Support {
    /// The database provides it directly.
    Native,
    /// The driver builds it from other means (a watcher connection, a timer).
    Emulated,
    /// Not offered.
    Unsupported,
}

impl Support {
    /// Native or emulated.
    pub fn is_supported(self) -> bool {
        !matches!(self, Self::Unsupported)
    }
}

/// What a driver can do beyond the required contract, and its bounds (the
/// model is opendal's `Capability`). The coordinator sizes its takeover
/// delay from [`loss_detection_bound`](Capabilities::loss_detection_bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// How [`SessionSignals::lost`] learns that a connection ended.
    pub loss_signal: Support,
    /// The longest time from the server ending a session (terminate, restart,
    /// failover, `KILL`) to the loss signal firing, on a healthy network.
    /// `None` when the driver cannot say (no loss signal).
    pub loss_detection_bound: Option<Duration>,
    /// Whether sessions learn of releases other sessions announce
    /// ([`SessionSignals::release_hints`], clause 12).
    pub release_hint: Support,
    /// How [`Session::probe`] looks: `Native` when it takes nothing (the
    /// database can tell who holds a key), `Unsupported` for the default,
    /// which takes and gives back, so two concurrent probes can see each
    /// other's momentary holds. Balancing then counts a member only when two
    /// probes in a row saw it.
    pub probe: Support,
}

impl Capabilities {
    /// Nothing beyond the required contract: no loss signal, no hint.
    pub const fn none() -> Self {
        Self {
            loss_signal: Support::Unsupported,
            loss_detection_bound: None,
            release_hint: Support::Unsupported,
            probe: Support::Unsupported,
        }
    }

    /// With a loss signal of this kind, firing within `bound`.
    pub const fn with_loss_signal(mut self, support: Support, bound: Duration) -> Self {
        self.loss_signal = support;
        self.loss_detection_bound = Some(bound);
        self
    }

    /// With a release hint of this kind.
    pub const fn with_release_hint(mut self, support: Support) -> Self {
        self.release_hint = support;
        self
    }

    /// With a probe of this kind (a driver that overrides
    /// [`Session::probe`] to take nothing states `Native`).
    pub const fn with_probe(mut self, support: Support) -> Self {
        self.probe = support;
        self
    }
}

impl Default for Capabilities {
    fn default() -> Self {
        Self::none()
    }
}

/// A database backend that opens lock sessions.
///
/// Cloning a driver must be cheap (share the configuration behind an `Arc`):
/// the coordinator keeps one and opens one session per database.
pub trait Driver: Clone + Send + Sync + 'static {
    /// The session type.
    type Session: Session;

    /// A short name for logs and errors, e.g. `postgres`.
    fn name(&self) -> &'static str;

    /// Opens a session: one dedicated connection to `database`, labelled with
    /// `node` where the database shows connection names
    /// (`application_name`, program name) so operators see who holds what.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a dropped connect leaves nothing behind but a connection
    /// the database closes.
    fn connect(
        &self,
        database: &DatabaseId,
        node: &NodeId,
    ) -> impl Future<Output = Result<Self::Session>> + Send;

    /// How long the database may keep a vanished session's locks before it
    /// notices and frees them, when the driver knows (e.g. from the keepalive
    /// settings it applies). The coordinator checks its own loss detection
    /// fits inside this window, so a cut-off node stops its work before the
    /// database hands its locks to another node.
    fn lock_release_window(&self) -> Option<Duration> {
        None
    }

    /// The driver's own limit for opening a session, when it has one. The
    /// coordinator keeps its outer connect deadline above it, so the driver's
    /// typed timeout error (naming the server) is the one reported.
    fn connect_timeout(&self) -> Option<Duration> {
        None
    }

    /// What the driver offers beyond the required contract (default: nothing).
    fn capabilities(&self) -> Capabilities {
        Capabilities::none()
    }
}

/// One dedicated connection to one database, holding session-scoped locks.
///
/// Every method takes `&mut self`: a session is used by one task at a time,
/// as its connection is.
pub trait Session: Send + 'static {
    /// The session's bookkeeping: held keys, trust, loss signal. Every
    /// driver keeps exactly one [`Holds`] per session and goes through it for
    /// every round trip; `database`, `held` and `signals` answer from it.
    fn holds(&self) -> &Holds;

    /// The database this session is connected to.
    fn database(&self) -> &DatabaseId {
        self.holds().database()
    }

    /// The keys this session holds, as far as it knows.
    fn held(&self) -> Vec<LockKey> {
        self.holds().held()
    }

    /// The session's signals (clause 8): an owned handle, taken once when
    /// the session opens and watched apart from it, whose `lost` token fires
    /// as soon as the driver sees the connection end. Every call answers
    /// handles on the same signals.
    fn signals(&self) -> SessionSignals {
        self.holds().signals()
    }

    /// Tries to take every key in `keys` without waiting, in **one round
    /// trip**; answers one `bool` per key, in order. Keys already held answer
    /// `true` and are not locked a second time. Duplicate keys in one batch
    /// are allowed and answered alike.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe at the database level: if the future is dropped after
    /// the request was sent, some keys may be held without the session
    /// knowing. Drivers then poison the session (see
    /// [`Holds`](crate::Holds)) so the next [`verify`](Session::verify) fails
    /// and the coordinator discards it; the contract suite checks this.
    fn try_acquire(&mut self, keys: &[LockKey]) -> impl Future<Output = Result<Vec<bool>>> + Send;

    /// Waits until `key` is granted (`Ok(true)`) or `cancel` fires
    /// (`Ok(false)`), without polling where the database can block.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe, both through `cancel` and by dropping the future: a
    /// cancelled wait leaves the key not held by this session.
    fn acquire(
        &mut self,
        key: &LockKey,
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Releases `key`. Answers `true` if it was held, `false` (not an error)
    /// if it was not. The default is a one-key
    /// [`release_many`](Session::release_many).
    fn release(&mut self, key: &LockKey) -> impl Future<Output = Result<bool>> + Send {
        async move {
            Ok(self
                .release_many(std::slice::from_ref(key))
                .await?
                .first()
                .copied()
                .unwrap_or(false))
        }
    }

    /// Releases each key in `keys`, in **one round trip** for the held ones
    /// (none when none is held), answering like
    /// [`release`](Session::release) per key (`true` only for the first
    /// appearance of a key that was held).
    fn release_many(&mut self, keys: &[LockKey]) -> impl Future<Output = Result<Vec<bool>>> + Send;

    /// Releases `keys` like [`release_many`](Session::release_many) and,
    /// where the driver offers release hints, announces it to the
    /// database's other sessions **in the same round trip** (Postgres:
    /// `NOTIFY` in the unlocking statement). `clean[i]` says whether
    /// `keys[i]` was handed over cleanly (its work stopped before the
    /// release), which lets the next holder skip its takeover delay; a
    /// missing entry counts as not clean.
    ///
    /// The default releases without announcing: other nodes then find the
    /// keys at their next poll.
    fn release_announced(
        &mut self,
        keys: &[LockKey],
        clean: &[bool],
    ) -> impl Future<Output = Result<Vec<bool>>> + Send {
        let _ = clean;
        self.release_many(keys)
    }

    /// Answers, per key, whether **another** session holds it; keys this
    /// session holds answer `false`. Leaves every key as it was.
    ///
    /// Balancing counts live members with it every cycle. The default
    /// takes the keys not held here with one
    /// [`try_acquire`](Session::try_acquire) and gives the granted ones
    /// back with one [`release_many`](Session::release_many): correct on
    /// any driver, but two round trips during which the probed keys look
    /// held to others. Drivers that can look without locking (`pg_locks`,
    /// their own lock table) override it with one round trip.
    fn probe(&mut self, keys: &[LockKey]) -> impl Future<Output = Result<Vec<bool>>> + Send {
        async move {
            let mine: std::collections::HashSet<LockKey> = self.held().into_iter().collect();
            let mut seen = std::collections::HashSet::new();
            let asked: Vec<LockKey> = keys
                .iter()
                .filter(|k| !mine.contains(*k) && seen.insert((*k).clone()))
                .cloned()
                .collect();
            if asked.is_empty() {
                return Ok(vec![false; keys.len()]);
            }
            let granted = self.try_acquire(&asked).await?;
            let taken: Vec<LockKey> = asked
                .iter()
                .zip(&granted)
                .filter(|(_, g)| **g)
                .map(|(k, _)| k.clone())
                .collect();
            if !taken.is_empty() {
                self.release_many(&taken).await?;
            }
            let free: std::collections::HashSet<LockKey> = taken.into_iter().collect();
            Ok(keys
                .iter()
                .map(|key| !mine.contains(key) && !free.contains(key))
                .collect())
        }
    }

    /// Releases every key this session holds.
    fn release_all(&mut self) -> impl Future<Output = Result<()>> + Send {
        async move {
            for key in self.held() {
                self.release(&key).await?;
            }
            Ok(())
        }
    }

    /// Proves, in one cheap round trip, that the connection is alive and the
    /// database still shows this session's locks.
    ///
    /// # Errors
    ///
    /// [`Error::SessionLost`](crate::Error::SessionLost) when it cannot: the
    /// caller must then treat every held key as lost and drop the session.
    fn verify(&mut self) -> impl Future<Output = Result<()>> + Send;

    /// Releases every key and closes the connection.
    fn close(self) -> impl Future<Output = Result<()>> + Send;
}
