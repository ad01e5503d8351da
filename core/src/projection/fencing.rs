//! The fencing decisions every SQL checkpoint store makes around its own
//! statements, so each store keeps only its dialect's SQL.
//!
//! A store saves with one fenced statement, `UPDATE subscriptions SET
//! last_position = GREATEST(last_position, ?) WHERE subscription_name = ?
//! AND epoch = ?`, and only when it changed no row reads the stored epoch to
//! say why: the save is refused with [`CheckpointError::FencedOff`] or
//! [`CheckpointError::NotClaimed`], the same errors on every store.

use super::CheckpointError;
use crate::error::BoxError;

impl CheckpointError {
    /// A store's own failure (connection, statement, decoding), as
    /// [`CheckpointError::Store`]; for `.map_err(CheckpointError::store)`.
    pub fn store(err: impl Into<BoxError>) -> Self {
        Self::Store(err.into())
    }

    /// The check before a save sends anything: no claim answers an epoch
    /// below 1, so such a save is [`CheckpointError::NotClaimed`].
    ///
    /// # Errors
    ///
    /// [`CheckpointError::NotClaimed`] when `epoch` is below 1.
    pub fn check_save_epoch(subscription: &str, epoch: i64) -> Result<(), Self> {
        if epoch < 1 {
            return Err(Self::NotClaimed {
                subscription: subscription.to_string(),
            });
        }
        Ok(())
    }

    /// The verdict on a fenced save that changed no row, from the epoch
    /// stored now (`None`: no row). The same epoch is a save that changed
    /// nothing (MySQL counts changed rows, not matched ones: a position not
    /// above the stored one changes none), so it is saved.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::FencedOff`] when another epoch is stored,
    /// [`CheckpointError::NotClaimed`] when no row is.
    pub fn unchanged_save(subscription: &str, ours: i64, current: Option<i64>) -> Result<(), Self> {
        match current {
            Some(current) if current == ours => Ok(()),
            Some(current) => Err(Self::FencedOff {
                subscription: subscription.to_string(),
                ours,
                current,
            }),
            None => Err(Self::NotClaimed {
                subscription: subscription.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_no_claim_answers_is_not_claimed() {
        assert!(CheckpointError::check_save_epoch("s", 1).is_ok());
        for epoch in [0, -1, i64::MIN] {
            match CheckpointError::check_save_epoch("s", epoch) {
                Err(CheckpointError::NotClaimed { subscription }) => assert_eq!(subscription, "s"),
                other => panic!("epoch {epoch}: expected NotClaimed, got {other:?}"),
            }
        }
    }

    #[test]
    fn an_unchanged_save_is_judged_by_the_stored_epoch() {
        assert!(CheckpointError::unchanged_save("s", 3, Some(3)).is_ok());
        match CheckpointError::unchanged_save("s", 3, Some(4)) {
            Err(CheckpointError::FencedOff {
                subscription,
                ours,
                current,
            }) => assert_eq!((subscription.as_str(), ours, current), ("s", 3, 4)),
            other => panic!("expected FencedOff, got {other:?}"),
        }
        assert!(matches!(
            CheckpointError::unchanged_save("s", 3, None),
            Err(CheckpointError::NotClaimed { .. })
        ));
    }

    #[test]
    fn a_store_failure_keeps_its_source() {
        let err = CheckpointError::store(std::io::Error::other("disk on fire"));
        match err {
            CheckpointError::Store(source) => assert_eq!(source.to_string(), "disk on fire"),
            other => panic!("expected Store, got {other:?}"),
        }
    }
}
