//! Fair share without a leader: membership by lock slots, share by rank.
//!
//! Every balancing node holds `weight` **member slots** in each database it
//! competes in: keys `members:<group>:<i>` for `i` in `0..max_members`,
//! taken lowest-free-first. The database frees a crashed node's slots like
//! any lock, so the slots held are the live members, learnt every cycle with
//! [`Session::probe`](crate::Session::probe), with no leader and no
//! heartbeat table.
//!
//! With `S` sets and `W` live slots, slot of rank `r` (its position among
//! the live slots, lowest first) is worth `S / W` sets, plus one if
//! `r < S % W`; a node's share is the sum over its slots. The shares add up
//! to exactly `S`, every node computes its own from the same probe, and a
//! node alone takes everything. A node above its share stops and releases
//! the surplus (after [`settle_cycles`](Balancing::settle_cycles) cycles in
//! a row above it, at most [`max_moves_per_cycle`](Balancing::max_moves_per_cycle)
//! at a time), announcing the release so nodes with room take it at once.

use crate::error::Result;
use crate::key::LockKey;

/// How a node balances sets with its peers. Distributors hand it to the
/// coordinator through [`Distributor::balancing`](crate::Distributor::balancing);
/// the `Balanced` distributor in `shardlock-distributors` builds it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Balancing {
    /// Nodes balance with the nodes of the same group (part of the member
    /// slot names).
    pub group: String,
    /// Member slots per database; the largest total weight a group can have.
    pub max_members: u32,
    /// This node's capacity in slots: a node of weight 2 gets twice the share
    /// of a node of weight 1.
    pub weight: u32,
    /// The most surplus sets released in one cycle.
    pub max_moves_per_cycle: usize,
    /// Cycles in a row a surplus must be seen before it is released, so a
    /// node that is joining or leaving does not make the others thrash.
    pub settle_cycles: u32,
}

impl Balancing {
    /// Group `default`, 64 member slots, weight 1, at most 8 moves per
    /// cycle, surplus released when seen on 2 cycles in a row.
    pub fn new() -> Self {
        Self {
            group: "default".to_string(),
            max_members: 64,
            weight: 1,
            max_moves_per_cycle: 8,
            settle_cycles: 2,
        }
    }

    /// The member slot keys, `members:<group>:<i>` for `i` in
    /// `0..max_members`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidLockName`](crate::Error::InvalidLockName) when the
    /// group makes an invalid name (NUL, too long).
    pub fn member_keys(&self) -> Result<Vec<LockKey>> {
        (0..self.max_members)
            .map(|i| LockKey::new(format!("members:{}:{i}", self.group)))
            .collect()
    }

    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// [`Error::Config`](crate::Error::Config) when the weight is zero or
    /// above `max_members`, `max_members` is zero or above 4096, or
    /// `max_moves_per_cycle` is zero.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(crate::error::Error::Config(m));
        if self.max_members == 0 || self.max_members > 4096 {
            return fail(format!(
                "balancing max_members must be within 1..=4096, not {}",
                self.max_members
            ));
        }
        if self.weight == 0 || self.weight > self.max_members {
            return fail(format!(
                "balancing weight must be within 1..=max_members ({}), not {}",
                self.max_members, self.weight
            ));
        }
        if self.max_moves_per_cycle == 0 {
            return fail("balancing max_moves_per_cycle must be at least 1".to_string());
        }
        self.member_keys().map(|_| ())
    }
}

impl Default for Balancing {
    fn default() -> Self {
        Self::new()
    }
}

/// This node's share of `total` sets, given the live member slots (indices,
/// any order, this node's included) and this node's own slots. Without any
/// live slot (nothing probed yet) a node takes everything; with live slots
/// but none of its own (all slots taken) it takes nothing.
pub fn fair_share(total: usize, live: &[u32], mine: &[u32]) -> usize {
    let mut live: Vec<u32> = live.to_vec();
    live.sort_unstable();
    live.dedup();
    let w = live.len();
    if w == 0 {
        return total;
    }
    let (base, extra) = (total / w, total % w);
    mine.iter()
        .filter_map(|slot| live.binary_search(slot).ok())
        .map(|rank| base + usize::from(rank < extra))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_total() {
        for total in [0usize, 1, 7, 10, 12, 120, 1001] {
            for members in 1u32..=7 {
                let live: Vec<u32> = (0..members).collect();
                let sum: usize = live.iter().map(|s| fair_share(total, &live, &[*s])).sum();
                assert_eq!(sum, total, "{total} sets over {members} members");
                let max = live.iter().map(|s| fair_share(total, &live, &[*s])).max();
                let min = live.iter().map(|s| fair_share(total, &live, &[*s])).min();
                assert!(max.unwrap_or(0) - min.unwrap_or(0) <= 1);
            }
        }
    }

    #[test]
    fn the_examples_of_the_issue() {
        let three = [0, 1, 2];
        assert!(three.iter().all(|s| fair_share(12, &three, &[*s]) == 4));
        let four = [0, 3, 5, 9];
        assert!(four.iter().all(|s| fair_share(120, &four, &[*s]) == 30));
        assert_eq!(fair_share(12, &[4], &[4]), 12, "alone takes everything");
        assert_eq!(fair_share(12, &[], &[]), 12, "nothing seen yet");
        assert_eq!(fair_share(12, &[0, 1], &[]), 0, "no slot, no share");
    }

    #[test]
    fn weights_are_slots() {
        // Node A holds slots 0 and 1 (weight 2), node B slot 2.
        let live = [0, 1, 2];
        assert_eq!(fair_share(12, &live, &[0, 1]), 8);
        assert_eq!(fair_share(12, &live, &[2]), 4);
    }

    #[test]
    fn settings_are_checked() {
        assert!(Balancing::new().validate().is_ok());
        let mut b = Balancing::new();
        b.weight = 0;
        assert!(b.validate().is_err());
        let mut b = Balancing::new();
        b.max_members = 0;
        assert!(b.validate().is_err());
        let mut b = Balancing::new();
        b.group = "a\0b".to_string();
        assert!(b.validate().is_err());
        assert_eq!(
            Balancing::new().member_keys().unwrap()[3].name(),
            "members:default:3"
        );
    }
}
