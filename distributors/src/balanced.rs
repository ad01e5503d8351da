use shardlock_core::{Balancing, Distributor, LockSet, Result};

/// Spreads another distributor's sets evenly over the live nodes, with no
/// leader: each node takes its fair share and gives back any surplus.
///
/// Membership is lock-only: every node holds `weight` member slots
/// (`members:<group>:<i>`) in each database it competes in, and counts the
/// slots held with one probe per cycle; the database frees a crashed node's
/// slots like any lock. With `S` sets and `W` live slots each slot is worth
/// `S / W` sets (the first `S % W` slots one more), so the shares add up to
/// `S`: three nodes and twelve sets settle at 4/4/4. A node above its share
/// stops the surplus sets' agents, then releases them (at most
/// [`max_moves_per_cycle`](Self::max_moves_per_cycle) per cycle, once the
/// surplus was seen [`settle_cycles`](Self::settle_cycles) cycles in a row,
/// so a stable cluster moves nothing); nodes with room take them at once,
/// woken by the release announcement where the driver offers one.
///
/// ```
/// use shardlock_core::{DatabaseId, Distributor, ShardId};
/// use shardlock_distributors::{Balanced, SingleTenant};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> shardlock_core::Result<()> {
/// let shards = (0..12).map(|i| ShardId::new(format!("orders:{i}")));
/// let distributor = Balanced::new(SingleTenant::new(DatabaseId::new("main"), "public", shards))
///     .group("orders")
///     .weight(2);
/// assert_eq!(distributor.lock_sets().await?.len(), 12);
/// let balancing = distributor.balancing().expect("balanced");
/// assert_eq!((balancing.group.as_str(), balancing.weight), ("orders", 2));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Balanced<D> {
    inner: D,
    balancing: Balancing,
}

impl<D: Distributor> Balanced<D> {
    /// Balances `inner`'s sets in group `default`, weight 1, 64 member
    /// slots, at most 8 moves per cycle, a surplus released when seen on two
    /// cycles in a row.
    pub fn new(inner: D) -> Self {
        Self {
            inner,
            balancing: Balancing::new(),
        }
    }

    /// Nodes balance with the nodes of the same group (use one group per
    /// kind of work sharing a database).
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.balancing.group = group.into();
        self
    }

    /// This node's capacity: a node of weight 2 gets twice the share of a
    /// node of weight 1 (it holds two member slots).
    pub fn weight(mut self, weight: u32) -> Self {
        self.balancing.weight = weight;
        self
    }

    /// The number of member slots, i.e. the largest total weight of the
    /// group.
    pub fn max_members(mut self, max: u32) -> Self {
        self.balancing.max_members = max;
        self
    }

    /// The most surplus sets a node releases in one cycle.
    pub fn max_moves_per_cycle(mut self, moves: usize) -> Self {
        self.balancing.max_moves_per_cycle = moves;
        self
    }

    /// Cycles in a row a surplus must be seen before it is released.
    pub fn settle_cycles(mut self, cycles: u32) -> Self {
        self.balancing.settle_cycles = cycles;
        self
    }

    /// The wrapped distributor.
    pub fn inner(&self) -> &D {
        &self.inner
    }
}

impl<D: Distributor> Distributor for Balanced<D> {
    async fn lock_sets(&self) -> Result<Vec<LockSet>> {
        self.inner.lock_sets().await
    }

    async fn shared_lock_sets(&self) -> Result<std::sync::Arc<[LockSet]>> {
        self.inner.shared_lock_sets().await
    }

    fn balancing(&self) -> Option<&Balancing> {
        Some(&self.balancing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SingleTenant;
    use shardlock_core::{DatabaseId, ShardId};

    #[tokio::test]
    async fn passes_the_sets_through_and_carries_the_settings() {
        let inner = SingleTenant::new(DatabaseId::new("db"), "s", ["a", "b"].map(ShardId::new));
        let d = Balanced::new(inner)
            .group("g")
            .weight(3)
            .max_members(10)
            .max_moves_per_cycle(2)
            .settle_cycles(4);
        assert_eq!(d.lock_sets().await.unwrap().len(), 2);
        let b = d.balancing().unwrap();
        assert_eq!(b.group, "g");
        assert_eq!(
            (
                b.weight,
                b.max_members,
                b.max_moves_per_cycle,
                b.settle_cycles
            ),
            (3, 10, 2, 4)
        );
        assert!(b.validate().is_ok());
        assert!(Balanced::new(d.inner().clone())
            .weight(11)
            .max_members(10)
            .balancing()
            .unwrap()
            .validate()
            .is_err());
    }
}
