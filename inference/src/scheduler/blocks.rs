//! The paged KV-cache block allocator: a fixed pool of blocks of `block_size` token positions,
//! sized once at start. A sequence owns a [`BlockTable`] (its blocks in position order) that
//! grows one block at a time as it decodes; nothing is reallocated per token. Blocks are
//! plain ids: the physical storage belongs to the model side ([`super::BatchModel`]).
//!
//! A block may be in several tables at once ([`BlockAllocator::share`]: sequences with the same
//! prompt prefix read the same full blocks); it returns to the pool when the last table that
//! holds it is released.

/// A fixed pool of KV blocks.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    block_size: usize,
    total: usize,
    /// Free block ids; the lowest id is handed out first (deterministic layouts).
    free: Vec<u32>,
    /// Tables holding each block (0 = free).
    refs: Vec<u32>,
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

    /// Blocks not owned by any sequence.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Grows `table` until it covers `positions` positions. All or nothing: on `false` (the
    /// pool ran dry) `table` is unchanged.
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

    /// Appends `block`, which another table holds, to `table` (both now read it). `false`
    /// (nothing changed) when `block` is free or outside the pool.
    pub fn share(&mut self, table: &mut BlockTable, block: u32) -> bool {
        match self.refs.get_mut(block as usize) {
            Some(r) if *r > 0 => {
                *r += 1;
                table.blocks.push(block);
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
        let mut freed = Vec::new();
        for b in table.blocks.drain(..).rev() {
            if let Some(r) = self.refs.get_mut(b as usize)
                && *r > 0
            {
                *r -= 1;
                if *r == 0 {
                    freed.push(b);
                }
            }
        }
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
}
