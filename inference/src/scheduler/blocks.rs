//! The paged KV-cache block allocator: a fixed pool of blocks of `block_size` token positions,
//! sized once at start. A sequence owns a [`BlockTable`] (its blocks in position order) that
//! grows one block at a time as it decodes; nothing is reallocated per token. Blocks are
//! plain ids: the physical storage belongs to the model side ([`super::BatchModel`]).
//!
//! A block may be in several tables at once ([`BlockAllocator::share`]: sequences with the same
//! prompt prefix read the same full blocks); it returns to the pool when the last table that
//! holds it is released — or, when the caller keeps it ([`BlockAllocator::release_keeping`]:
//! the scheduler's prefix cache), it stays out of the free list as *cached*: held by no table,
//! its K/V intact, adoptable again by [`BlockAllocator::share`] until the caller evicts it
//! ([`BlockAllocator::uncache`]). Every block is in exactly one state: free (in the free list),
//! cached, or held by at least one table; `free() + cached() + held() == total()`.

/// A fixed pool of KV blocks.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    block_size: usize,
    total: usize,
    /// Free block ids; the lowest id is handed out first (deterministic layouts).
    free: Vec<u32>,
    /// Tables holding each block (0 = free or cached).
    refs: Vec<u32>,
    /// Blocks no table holds that are kept out of the free list (the prefix cache's).
    cached: Vec<bool>,
    /// How many `cached` are set.
    n_cached: usize,
}

impl BlockAllocator {
    /// A pool of `total` blocks of `block_size` positions each (both at least 1).
    pub fn new(block_size: usize, total: usize) -> Self {
        let block_size = block_size.max(1);
        BlockAllocator {
            block_size,
            total,
            free: (0..total as u32).rev().collect(),
            refs: vec![0; total],
            cached: vec![false; total],
            n_cached: 0,
        }
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Blocks in the free list (neither held by a table nor cached).
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Blocks held by no table but kept (with their K/V) until evicted.
    pub fn cached(&self) -> usize {
        self.n_cached
    }

    /// Blocks held by at least one table.
    pub fn held(&self) -> usize {
        self.total - self.free.len() - self.n_cached
    }

    /// Whether `block` is cached (held by no table, not free).
    pub fn is_cached(&self, block: u32) -> bool {
        self.cached.get(block as usize).copied().unwrap_or(false)
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Grows `table` until it covers `positions` positions, from the free list only (evict
    /// cached blocks first with [`BlockAllocator::uncache`]). All or nothing: on `false` (the
    /// free list ran dry) `table` is unchanged.
    pub fn grow(&mut self, table: &mut BlockTable, positions: usize) -> bool {
        let need = self
            .blocks_for(positions)
            .saturating_sub(table.blocks.len());
        if need > self.free.len() {
            return false;
        }
        for _ in 0..need {
            if let Some(b) = self.free.pop() {
                self.refs[b as usize] = 1;
                table.blocks.push(b);
            }
        }
        true
    }

    /// Appends `block`, which another table holds or which is cached, to `table` (a cached
    /// block becomes held again). `false` (nothing changed) when `block` is free or outside
    /// the pool.
    pub fn share(&mut self, table: &mut BlockTable, block: u32) -> bool {
        let b = block as usize;
        match self.refs.get_mut(b) {
            Some(r) if *r > 0 => *r += 1,
            Some(r) if self.cached[b] => {
                *r = 1;
                self.cached[b] = false;
                self.n_cached -= 1;
            }
            _ => return false,
        }
        table.blocks.push(block);
        true
    }

    /// Moves cached `block` to the free list (evicted: the next [`BlockAllocator::grow`]
    /// hands it out first). `false` (nothing changed) when it is not cached.
    pub fn uncache(&mut self, block: u32) -> bool {
        match self.cached.get_mut(block as usize) {
            Some(c) if *c => {
                *c = false;
                self.n_cached -= 1;
                self.free.push(block);
                true
            }
            _ => false,
        }
    }

    /// Tables holding `block` (0: free).
    pub fn holders(&self, block: u32) -> u32 {
        self.refs.get(block as usize).copied().unwrap_or(0)
    }

    /// Drops `table`'s hold on each of its blocks and empties it; returns the blocks that went
    /// back to the pool (no other table held them).
    pub fn release(&mut self, table: &mut BlockTable) -> Vec<u32> {
        self.release_keeping(table, |_| false)
    }

    /// [`BlockAllocator::release`], except that each block no other table holds is offered
    /// to `keep`, in position order (so `keep` may decide a block from its predecessor's
    /// fate): `true` makes it cached instead of free. Returns the blocks that went back to the
    /// free list.
    pub fn release_keeping(
        &mut self,
        table: &mut BlockTable,
        mut keep: impl FnMut(u32) -> bool,
    ) -> Vec<u32> {
        let mut freed = Vec::new();
        for b in table.blocks.drain(..) {
            if let Some(r) = self.refs.get_mut(b as usize)
                && *r > 0
            {
                *r -= 1;
                if *r == 0 {
                    if keep(b) {
                        self.cached[b as usize] = true;
                        self.n_cached += 1;
                    } else {
                        freed.push(b);
                    }
                }
            }
        }
        // The first position's block on top: handed out first again.
        freed.reverse();
        self.free.extend(freed.iter().copied());
        freed
    }
}

/// The blocks of one sequence, in position order: position `p` lives in block
/// `blocks[p / block_size]` at offset `p % block_size`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<u32>,
}

impl BlockTable {
    /// The block ids, in position order.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }
    /// Number of blocks owned.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }
    /// Owns no block.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_per_block_and_releases_everything() {
        let mut a = BlockAllocator::new(4, 5);
        let mut t = BlockTable::default();
        assert!(a.grow(&mut t, 1));
        assert_eq!(t.blocks(), &[0]);
        assert!(a.grow(&mut t, 4), "same block still covers 4 positions");
        assert_eq!(t.len(), 1);
        assert!(a.grow(&mut t, 5));
        assert_eq!(t.blocks(), &[0, 1]);
        let mut u = BlockTable::default();
        assert!(!a.grow(&mut u, 13), "needs 4 blocks, 3 left");
        assert!(u.is_empty() && a.free() == 3, "all or nothing");
        assert!(a.grow(&mut u, 12));
        assert_eq!(a.free(), 0);
        a.release(&mut t);
        a.release(&mut u);
        assert_eq!(a.free(), a.total());
        assert!(t.is_empty());
    }

    #[test]
    fn a_shared_block_returns_when_its_last_holder_releases() {
        let mut a = BlockAllocator::new(4, 4);
        let mut t = BlockTable::default();
        assert!(a.grow(&mut t, 8));
        let mut u = BlockTable::default();
        assert!(a.share(&mut u, t.blocks()[0]));
        assert!(!a.share(&mut u, 3), "a free block cannot be shared");
        assert!(!a.share(&mut u, 9), "outside the pool");
        assert!(a.grow(&mut u, 5));
        assert_eq!(u.blocks(), &[0, 2]);
        assert_eq!(a.holders(0), 2);
        assert_eq!(a.free(), 1);
        assert_eq!(a.release(&mut t), vec![1], "block 0 is still u's");
        assert_eq!(a.holders(0), 1);
        let mut back = a.release(&mut u);
        back.sort_unstable();
        assert_eq!(back, vec![0, 2]);
        assert_eq!(a.free(), 4);
    }

    #[test]
    fn kept_blocks_are_cached_until_adopted_or_evicted() {
        let mut a = BlockAllocator::new(4, 4);
        let mut t = BlockTable::default();
        assert!(a.grow(&mut t, 12));
        assert_eq!(t.blocks(), &[0, 1, 2]);
        let mut u = BlockTable::default();
        assert!(a.share(&mut u, 0));
        // Position order: 0 (still u's, not offered), 1, 2.
        let mut offered = Vec::new();
        let freed = a.release_keeping(&mut t, |b| {
            offered.push(b);
            b == 1
        });
        assert_eq!(offered, vec![1, 2]);
        assert_eq!(freed, vec![2]);
        assert!(a.is_cached(1) && !a.is_cached(0) && !a.is_cached(2));
        assert_eq!((a.free(), a.cached(), a.held()), (2, 1, 1));
        // A cached block is held again when a table adopts it …
        let mut v = BlockTable::default();
        assert!(a.share(&mut v, 1));
        assert_eq!(a.holders(1), 1);
        assert_eq!((a.free(), a.cached(), a.held()), (2, 0, 2));
        assert!(!a.uncache(1), "held, not cached");
        a.release_keeping(&mut v, |_| true);
        assert_eq!((a.free(), a.cached(), a.held()), (2, 1, 1));
        // … and goes to the free list when evicted, handed out next.
        assert!(a.uncache(1));
        assert!(!a.uncache(1));
        assert_eq!((a.free(), a.cached(), a.held()), (3, 0, 1));
        let mut w = BlockTable::default();
        assert!(a.grow(&mut w, 1));
        assert_eq!(w.blocks(), &[1]);
        assert!(!a.grow(&mut w, 16), "3 more blocks wanted, 2 free");
        a.release(&mut u);
        a.release(&mut w);
        assert_eq!(a.free(), a.total());
    }
}
