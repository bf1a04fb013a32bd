//! The host tier of the prefix cache: cached blocks evicted from the device are copied to host
//! memory (the backend's [`Backend::HostBlocks`], page-locked on a GPU) and copied back into a
//! fresh device block when a later prompt's prefix reaches them, instead of being recomputed.
//!
//! Bookkeeping is the device tier's own [`PrefixIndex`], over host slots instead of blocks: every
//! slot holding a prefix is parked (evictable, least recently used first) except while a copy
//! back from it is planned. The tier is inclusive: a restored block keeps its host copy, so the
//! device can evict it again without a second copy out.
//!
//! Copies are planned while requests are admitted and issued together by [`HostTier::flush`]:
//! all copies out first, then all copies back, so that a slot or a block reused within one
//! admission round is read before it is overwritten (the backend keeps issue order).

use super::prefix::{Entry, PrefixIndex};
use crate::backend::{Backend, BlockCopy};
use crate::error::{CoreError, Result};

/// Running totals of the host tier, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostTierStats {
    /// Blocks copied from the device to the host.
    pub saved_blocks: u64,
    /// Blocks copied from the host back into the device.
    pub restored_blocks: u64,
    /// Batches of copies back (one per admission round that restored anything).
    pub restores: u64,
    /// Blocks the device evicted that the host already held (no copy needed).
    pub already_held: u64,
    /// Prefixes the host tier evicted to make room for newer ones.
    pub evicted_blocks: u64,
}

pub(crate) struct HostTier<H> {
    storage: H,
    index: PrefixIndex,
    /// Slots used once and emptied since (by clear).
    free: Vec<u32>,
    /// Slots handed out so far; slot ids are `0..used`.
    used: u32,
    max_slots: u32,
    block_bytes: usize,
    saves: Vec<BlockCopy>,
    restores: Vec<BlockCopy>,
    stats: HostTierStats,
}

impl<H> HostTier<H> {
    pub(crate) fn new(storage: H, max_slots: u32, block_bytes: usize) -> Self {
        HostTier {
            storage,
            index: PrefixIndex::new(0),
            free: Vec::new(),
            used: 0,
            max_slots,
            block_bytes,
            saves: Vec::new(),
            restores: Vec::new(),
            stats: HostTierStats::default(),
        }
    }

    /// The host slot holding `tokens` after the prefix `parent`: (slot, chain id).
    pub(crate) fn get(&self, parent: u64, tokens: &[u32]) -> Option<(u32, u64)> {
        self.index.get(parent, tokens)
    }

    /// Keeps `slot` from being evicted until the planned copy back from it is issued.
    pub(crate) fn pin(&mut self, slot: u32) {
        self.index.unpark(slot);
    }

    /// Plans the copy of pinned `slot` into device block `block` (issued by `flush`).
    pub(crate) fn plan_restore(&mut self, slot: u32, block: u32) {
        self.restores.push(BlockCopy { block, slot });
    }

    /// Takes in what the device evicted from `block`: plans its copy to a host slot, evicting the
    /// least recently used unpinned slot when the tier is full. Does nothing when the host holds
    /// the prefix already, or when every slot is pinned.
    pub(crate) fn save(&mut self, block: u32, held: Entry) {
        if let Some((slot, _)) = self.index.get(held.parent, &held.tokens) {
            if self.index.is_parked(slot) {
                self.index.park(slot); // used again: to the back of the queue
            }
            self.stats.already_held += 1;
            return;
        }
        let slot = if let Some(s) = self.free.pop() {
            s
        } else if self.used < self.max_slots {
            self.used += 1;
            self.index.grow(self.used as usize);
            self.used - 1
        } else if let Some((s, _)) = self.index.evict() {
            self.stats.evicted_blocks += 1;
            // A copy into this slot planned earlier in this round is overwritten before use.
            self.saves.retain(|c| c.slot != s);
            s
        } else {
            return;
        };
        self.index
            .insert(held.parent, &held.tokens, slot, Some(held.id));
        self.index.park(slot);
        self.saves.push(BlockCopy { block, slot });
    }

    /// Issues the planned copies, out then back, and unpins the slots copied back from (the last
    /// block of a restored prefix first, so that the host, like the device, loses a prefix's
    /// tail before its head). Returns the device blocks being written by copies back, in flight
    /// until [`Backend::await_imports`]. On error the tier forgets everything (what reached
    /// the host is unknown), and returns with the error the blocks that were to be copied back.
    pub(crate) fn flush<B: Backend<HostBlocks = H>>(
        &mut self,
        backend: &B,
        cache: &mut B::Cache,
    ) -> std::result::Result<Vec<u32>, (CoreError, Vec<u32>)> {
        let saves = std::mem::take(&mut self.saves);
        let restores = std::mem::take(&mut self.restores);
        for c in restores.iter().rev() {
            self.index.park(c.slot);
        }
        let issued = (|| {
            if !saves.is_empty() {
                backend.export_blocks(cache, &mut self.storage, &saves)?;
            }
            if !restores.is_empty() {
                backend.import_blocks(&mut self.storage, cache, &restores)?;
            }
            Ok(())
        })();
        let blocks = restores.iter().map(|c| c.block).collect();
        if let Err(e) = issued {
            self.clear();
            return Err((e, blocks));
        }
        self.stats.saved_blocks += saves.len() as u64;
        self.stats.restored_blocks += restores.len() as u64;
        self.stats.restores += u64::from(!restores.is_empty());
        Ok(blocks)
    }

    /// Orders every copy back issued so far before the next step (see [`Backend::await_imports`]).
    pub(crate) fn await_imports<B: Backend<HostBlocks = H>>(
        &mut self,
        backend: &B,
        cache: &mut B::Cache,
    ) -> Result<()> {
        backend.await_imports(&mut self.storage, cache)
    }

    /// Forgets every prefix the tier holds (the memory stays allocated for reuse).
    pub(crate) fn clear(&mut self) {
        self.index.clear();
        self.saves.clear();
        self.restores.clear();
        self.free = (0..self.used).rev().collect();
    }

    pub(crate) fn cached_blocks(&self) -> usize {
        self.index.cached_blocks()
    }
    pub(crate) fn max_slots(&self) -> usize {
        self.max_slots as usize
    }
    pub(crate) fn block_bytes(&self) -> usize {
        self.block_bytes
    }
    pub(crate) fn stats(&self) -> HostTierStats {
        self.stats
    }
    pub(crate) fn storage_mut(&mut self) -> &mut H {
        &mut self.storage
    }
}
