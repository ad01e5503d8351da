//! The bookkeeping every session needs, written once: which keys it holds,
//! whether it can still be trusted, and its loss signal.
//!
//! Databases stack session locks (PostgreSQL, SQL Server and MySQL count a
//! key taken twice as two holds), so a session must never ask for a key it
//! already holds, and must know exactly what it holds. A driver keeps one
//! [`Holds`] per session and goes through it for every round trip:
//!
//! ```
//! use shardlock_core::{DatabaseId, Holds, LockKey, Result};
//!
//! # fn send_to_database(keys: &[LockKey]) -> Vec<bool> { keys.iter().map(|_| true).collect() }
//! fn try_acquire(holds: &mut Holds, keys: &[LockKey]) -> Result<Vec<bool>> {
//!     let ask = holds.to_acquire(keys); // not held yet, each once
//!     if !ask.is_empty() {
//!         holds.begin("try_acquire")?; // refuses a broken or lost session
//!         let granted = send_to_database(&ask); // one round trip
//!         holds.end();
//!         holds.record_acquired(&ask, &granted)?;
//!     }
//!     Ok(holds.answer(keys))
//! }
//!
//! let mut holds = Holds::new(DatabaseId::new("app"));
//! let key = LockKey::new("orders")?;
//! assert_eq!(try_acquire(&mut holds, &[key.clone(), key.clone()])?, [true, true]);
//! assert_eq!(holds.len(), 1, "taken once, not stacked");
//! # Ok::<(), shardlock_core::Error>(())
//! ```
//!
//! # Invariants
//!
//! 1. While the session is healthy, the held set is exactly what the
//!    database shows this session holding, each key once.
//! 2. When that can no longer be known the session is *poisoned*: a round
//!    trip whose future was dropped mid-flight ([`begin`](Holds::begin)
//!    without [`end`](Holds::end)), a session-fatal error, a failed verify,
//!    or a loss signal. From then on every [`begin`](Holds::begin) and
//!    [`ready`](Holds::ready) fails with [`Error::SessionLost`], and the
//!    loss signal has fired, so the coordinator stops the session's agents
//!    and replaces it.
//! 3. Poisoning is final.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

use crate::error::{DriverError, Error, ErrorKind, Result};
use crate::ids::DatabaseId;
use crate::key::LockKey;
use crate::signals::SessionSignals;

/// Hashes key ids ([`LockKey::id`]) for tables keyed by them: the
/// session's held keys here, and any driver's or coordinator's table of
/// 10,000 keys. A batch of 10,000 keys hashes each id several times
/// (deduplicate, look up, record, answer), and std's SipHash costs tens of
/// nanoseconds a time; one folded 64×64→128-bit multiply of the id with a
/// per-process random seed mixes every bit (as `foldhash` does) in about
/// one, and the seed keeps a chosen set of names from colliding on purpose.
/// Meant for `i64` ids and for [`LockKey`]s (which hash their id); other
/// values are hashed 8 bytes at a time.
///
/// ```
/// use std::collections::HashMap;
/// use shardlock_core::{IdHash, LockKey};
///
/// let key = LockKey::new("orders")?;
/// let mut by_id: HashMap<i64, LockKey, IdHash> = HashMap::default();
/// by_id.insert(key.id(), key.clone());
/// assert_eq!(by_id.get(&key.id()), Some(&key));
/// # Ok::<(), shardlock_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct IdHash;

/// The per-process seed of [`IdHash`].
fn id_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64))
}

impl BuildHasher for IdHash {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher(id_seed())
    }
}

/// The hasher [`IdHash`] builds.
#[derive(Debug, Clone)]
pub struct IdHasher(u64);

impl IdHasher {
    fn mix(&mut self, value: u64) {
        let product = u128::from(self.0 ^ value) * 0x9e37_79b9_7f4a_7c15_u128;
        self.0 = (product >> 64) as u64 ^ product as u64;
    }
}

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
    }

    fn write_i64(&mut self, value: i64) {
        self.mix(value as u64);
    }
}

/// Held keys, trust and the loss signal of one session.
pub struct Holds {
    database: DatabaseId,
    held: HashMap<i64, LockKey, IdHash>,
    broken: Option<String>,
    in_flight: Option<&'static str>,
    signals: SessionSignals,
}

impl Holds {
    /// An empty, healthy session in `database`, with fresh signals.
    pub fn new(database: DatabaseId) -> Self {
        Self::with_signals(database, SessionSignals::new())
    }

    /// An empty, healthy session whose loss is signalled through `signals`
    /// (e.g. signals a connection watcher fires).
    pub fn with_signals(database: DatabaseId, signals: SessionSignals) -> Self {
        Self {
            database,
            held: HashMap::with_hasher(IdHash),
            broken: None,
            in_flight: None,
            signals,
        }
    }

    /// The session's database.
    pub fn database(&self) -> &DatabaseId {
        &self.database
    }

    /// A handle on the session's signals, for
    /// [`Session::signals`](crate::Session::signals).
    pub fn signals(&self) -> SessionSignals {
        self.signals.clone()
    }

    /// The held keys, in no particular order.
    pub fn held(&self) -> Vec<LockKey> {
        self.held.values().cloned().collect()
    }

    /// The held keys, borrowed.
    pub fn keys(&self) -> impl Iterator<Item = &LockKey> {
        self.held.values()
    }

    /// The held key with this [`LockKey::id`].
    pub fn get(&self, id: i64) -> Option<&LockKey> {
        self.held.get(&id)
    }

    /// Whether `key` is held.
    pub fn contains(&self, key: &LockKey) -> bool {
        self.held.contains_key(&key.id())
    }

    /// How many keys are held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Why the session can no longer be used, once it cannot.
    pub fn broken_reason(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Whether the session was poisoned or its loss signalled.
    pub fn is_broken(&self) -> bool {
        self.broken.is_some() || self.signals.is_lost()
    }

    /// The round trip that was started and never ended, if any.
    pub fn in_flight(&self) -> Option<&'static str> {
        self.in_flight
    }

    /// Checks the session can be used: it is not poisoned, no earlier round
    /// trip was interrupted, and its loss was not signalled. Poisons it
    /// otherwise.
    ///
    /// # Errors
    ///
    /// [`Error::SessionLost`] when the session cannot be trusted.
    pub fn ready(&mut self) -> Result<()> {
        if let Some(op) = self.in_flight.take() {
            self.mark_broken(format!(
                "an earlier {op} was interrupted mid-round-trip (its future was dropped), so the \
                 locks this session holds are unknown"
            ));
        }
        if self.broken.is_none() && self.signals.is_lost() {
            let reason = self
                .signals
                .reason()
                .unwrap_or_else(|| "the connection ended".to_string());
            self.mark_broken(reason);
        }
        match &self.broken {
            Some(reason) => Err(Error::session_lost(&self.database, reason.clone())),
            None => Ok(()),
        }
    }

    /// Starts a round trip named `op`: [`ready`](Self::ready), then marks it
    /// in flight until [`end`](Self::end). If the future is dropped in
    /// between, the next call finds it in flight and poisons the session.
    ///
    /// # Errors
    ///
    /// As [`ready`](Self::ready).
    pub fn begin(&mut self, op: &'static str) -> Result<()> {
        self.ready()?;
        self.in_flight = Some(op);
        Ok(())
    }

    /// Ends the round trip started by [`begin`](Self::begin), whatever its
    /// outcome.
    pub fn end(&mut self) {
        self.in_flight = None;
    }

    /// Poisons the session (the first reason is kept), fires its loss
    /// signal, and answers the [`Error::SessionLost`] to return.
    pub fn poison(&mut self, reason: impl Into<String>) -> Error {
        let reason = reason.into();
        self.mark_broken(reason);
        Error::session_lost(&self.database, self.broken.clone().unwrap_or_default())
    }

    /// Maps a driver error through [`Error::from_driver`]; a session-fatal
    /// one poisons the session first.
    pub fn fail<E: DriverError>(&mut self, err: E) -> Error {
        if err.kind() == ErrorKind::SessionFatal {
            self.mark_broken(err.to_string());
        }
        Error::from_driver(&self.database, err)
    }

    fn mark_broken(&mut self, reason: String) {
        if self.broken.is_none() {
            tracing::warn!(database = %self.database, held = self.held.len(), %reason, "session broken");
            self.signals.fire_lost(reason.clone());
            self.broken = Some(reason);
        }
    }

    /// [`ready`](Self::ready), then [`to_acquire`](Self::to_acquire): the
    /// keys of a batch to send, empty when every key is held already.
    ///
    /// # Errors
    ///
    /// As [`ready`](Self::ready).
    pub fn pending(&mut self, keys: &[LockKey]) -> Result<Vec<LockKey>> {
        self.ready()?;
        Ok(self.to_acquire(keys))
    }

    /// The keys of `keys` to send to the database: not held yet, each once,
    /// in order of first appearance.
    pub fn to_acquire(&self, keys: &[LockKey]) -> Vec<LockKey> {
        let mut seen = HashSet::with_capacity_and_hasher(keys.len(), IdHash);
        keys.iter()
            .filter(|k| !self.held.contains_key(&k.id()) && seen.insert(k.id()))
            .cloned()
            .collect()
    }

    /// Records the database's answer to a batch: `granted[i]` answers
    /// `asked[i]`.
    ///
    /// # Errors
    ///
    /// A count that does not match poisons the session (the database may
    /// hold keys the session does not know of).
    pub fn record_acquired(&mut self, asked: &[LockKey], granted: &[bool]) -> Result<()> {
        if asked.len() != granted.len() {
            return Err(self.poison(format!(
                "the database answered {} of {} keys of a batch",
                granted.len(),
                asked.len()
            )));
        }
        self.held.reserve(asked.len());
        for (key, ok) in asked.iter().zip(granted) {
            if *ok {
                let _ = self.held.insert(key.id(), key.clone());
            }
        }
        Ok(())
    }

    /// [`record_acquired`](Self::record_acquired), then the
    /// [`answer`](Self::answer) for the whole batch `keys`.
    ///
    /// # Errors
    ///
    /// As [`record_acquired`](Self::record_acquired).
    pub fn finish_acquire(
        &mut self,
        keys: &[LockKey],
        asked: &[LockKey],
        granted: &[bool],
    ) -> Result<Vec<bool>> {
        self.record_acquired(asked, granted)?;
        // The usual batch asks every key once, in order (none held before,
        // no duplicate): the database's answer is the answer, without a
        // lookup per key (a denied key is still looked up: the session may
        // hold it if `asked` did not come from `to_acquire`).
        if asked.len() == keys.len() && asked.iter().zip(keys).all(|(a, k)| a.id() == k.id()) {
            return Ok(granted
                .iter()
                .zip(asked)
                .map(|(ok, key)| *ok || self.held.contains_key(&key.id()))
                .collect());
        }
        Ok(self.answer(keys))
    }

    /// [`ready`](Self::ready), then whether `key` is held already (a
    /// blocking acquire of a held key answers at once).
    ///
    /// # Errors
    ///
    /// As [`ready`](Self::ready).
    pub fn holding(&mut self, key: &LockKey) -> Result<bool> {
        self.ready()?;
        Ok(self.contains(key))
    }

    /// One answer per key of `keys`: whether it is held now.
    pub fn answer(&self, keys: &[LockKey]) -> Vec<bool> {
        keys.iter()
            .map(|k| self.held.contains_key(&k.id()))
            .collect()
    }

    /// Records one granted key (a blocking acquire).
    pub fn insert(&mut self, key: LockKey) {
        let _ = self.held.insert(key.id(), key);
    }

    /// [`ready`](Self::ready), then [`to_release`](Self::to_release): the
    /// held keys of a batch to release, empty when none is held.
    ///
    /// # Errors
    ///
    /// As [`ready`](Self::ready).
    pub fn pending_release(&mut self, keys: &[LockKey]) -> Result<Vec<LockKey>> {
        self.ready()?;
        Ok(self.to_release(keys))
    }

    /// The keys of `keys` to release: held, each once, in order.
    pub fn to_release(&self, keys: &[LockKey]) -> Vec<LockKey> {
        let mut seen = HashSet::with_capacity_and_hasher(keys.len(), IdHash);
        keys.iter()
            .filter(|k| self.held.contains_key(&k.id()) && seen.insert(k.id()))
            .cloned()
            .collect()
    }

    /// Records released keys: `released[i]` is the database's answer for
    /// `asked[i]` (every asked key stops being held either way). Answers one
    /// `bool` per key of `keys`: `true` only for the first appearance of a
    /// key the database released.
    pub fn record_released(
        &mut self,
        keys: &[LockKey],
        asked: &[LockKey],
        released: &[bool],
    ) -> Vec<bool> {
        let mut answers: HashMap<i64, bool, IdHash> =
            HashMap::with_capacity_and_hasher(asked.len(), IdHash);
        for (i, key) in asked.iter().enumerate() {
            let _ = self.held.remove(&key.id());
            let _ = answers.insert(key.id(), released.get(i).copied().unwrap_or(false));
        }
        let mut first = HashSet::with_capacity_and_hasher(keys.len(), IdHash);
        keys.iter()
            .map(|k| first.insert(k.id()) && answers.get(&k.id()).copied().unwrap_or(false))
            .collect()
    }

    /// Forgets `key`; answers whether it was held.
    pub fn remove(&mut self, key: &LockKey) -> bool {
        self.held.remove(&key.id()).is_some()
    }

    /// Forgets every key (after the database released them all).
    pub fn clear(&mut self) {
        self.held.clear();
    }
}

impl fmt::Debug for Holds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Holds")
            .field("database", &self.database)
            .field("held", &self.held.len())
            .field("broken", &self.broken)
            .field("in_flight", &self.in_flight)
            .field("lost", &self.signals.is_lost())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<LockKey> {
        (0..n)
            .map(|i| LockKey::new(format!("holds-{i}")).unwrap())
            .collect()
    }

    #[test]
    fn batches_are_deduplicated_and_held_keys_not_asked_again() {
        let mut holds = Holds::new(DatabaseId::new("db"));
        let k = keys(3);
        let batch = vec![k[0].clone(), k[1].clone(), k[0].clone()];
        let ask = holds.to_acquire(&batch);
        assert_eq!(ask, vec![k[0].clone(), k[1].clone()]);
        holds.record_acquired(&ask, &[true, false]).unwrap();
        assert_eq!(holds.answer(&batch), vec![true, false, true]);
        let again = holds.to_acquire(&[k[0].clone(), k[2].clone()]);
        assert_eq!(again, vec![k[2].clone()], "a held key is never asked twice");
    }

    #[test]
    fn a_batch_of_new_keys_is_answered_from_the_grants() {
        let mut holds = Holds::new(DatabaseId::new("db"));
        let k = keys(3);
        let ask = holds.to_acquire(&k);
        assert_eq!(ask, k, "nothing held, no duplicate: every key asked");
        assert_eq!(
            holds
                .finish_acquire(&k, &ask, &[true, false, true])
                .unwrap(),
            vec![true, false, true]
        );
        // An `asked` list of keys the session holds already (not from
        // `to_acquire`): a denial does not hide the hold.
        let again = holds
            .finish_acquire(&k, &k, &[false, false, false])
            .unwrap();
        assert_eq!(again, vec![true, false, true]);
    }

    #[test]
    fn releases_answer_once_per_key() {
        let mut holds = Holds::new(DatabaseId::new("db"));
        let k = keys(2);
        holds.insert(k[0].clone());
        let batch = vec![k[0].clone(), k[1].clone(), k[0].clone()];
        let ask = holds.to_release(&batch);
        assert_eq!(ask, vec![k[0].clone()]);
        assert_eq!(
            holds.record_released(&batch, &ask, &[true]),
            vec![true, false, false]
        );
        assert!(holds.is_empty());
    }

    #[test]
    fn an_interrupted_round_trip_poisons_and_signals() {
        let mut holds = Holds::new(DatabaseId::new("db"));
        let signals = holds.signals();
        holds.begin("try_acquire").unwrap();
        // The future is dropped here: no `end`.
        let err = holds.ready().unwrap_err();
        assert!(err.is_session_fatal(), "{err}");
        assert!(err.to_string().contains("interrupted"), "{err}");
        assert!(signals.is_lost(), "poisoning fires the loss signal");
        assert!(holds.begin("verify").is_err(), "poisoning is final");
    }

    #[test]
    fn a_fired_signal_refuses_the_next_round_trip() {
        let mut holds = Holds::new(DatabaseId::new("db"));
        holds.signals().fire_lost("terminated by the server");
        let err = holds.begin("verify").unwrap_err();
        assert!(
            err.to_string().contains("terminated by the server"),
            "{err}"
        );
    }

    #[test]
    fn the_id_hash_spreads_ids_and_depends_on_every_bit() {
        let hash = |id: i64| IdHash.hash_one(id);
        assert_eq!(hash(42), hash(42), "deterministic within a process");
        // Ids that differ in one bit, high or low, land apart.
        let mut low_bits = HashSet::new();
        for bit in 0..64 {
            low_bits.insert(hash(1_i64 << bit) & 0x3ff);
        }
        assert!(
            low_bits.len() > 40,
            "{} distinct buckets of 64",
            low_bits.len()
        );
        // Sequential ids fill a table's buckets evenly.
        let mut buckets = [0u32; 64];
        for id in 0..64_000_i64 {
            buckets[(hash(id) & 63) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|b| (800..1200).contains(b)),
            "{buckets:?}"
        );
    }

    #[test]
    fn a_short_answer_poisons() {
        let mut holds = Holds::new(DatabaseId::new("db"));
        let k = keys(2);
        let err = holds.record_acquired(&k, &[true]).unwrap_err();
        assert!(err.is_session_fatal());
        assert!(holds.is_broken());
    }
}
