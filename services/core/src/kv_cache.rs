//! The paged latent KV cache: fixed-size blocks with reference counts, a block table per
//! sequence, and the prefix cache that lets sequences share the full blocks of a common prefix,
//! with an optional host-memory tier below it (kv_cache/host.rs). Storage lives in the backend;
//! this owns only the bookkeeping (backends see block tables and block copies only).
//!
//! Invariant: a sequence writes only into blocks it holds alone that hold no cached prefix
//! ([`KvCache::is_writable`]). A shared or cached block is full and its contents are final, so
//! a block is never changed while another sequence reads it.
//!
//! With the host tier, a block restored from the host is registered and handed out at admission,
//! before its contents arrive: it is "importing" ([`KvCache::is_importing`]) until
//! [`KvCache::await_imports`], and no step may read it before that.

mod host;
mod prefix;

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::error::{CoreError, Result};
use host::HostTier;
pub use host::HostTierStats;
use prefix::{PrefixIndex, ROOT};

pub struct KvCache<B: Backend> {
    /// Declared before `storage`, so dropped first: copies in flight read and write the device
    /// cache, and the tier waits for them when it is dropped.
    host: Option<HostTier<B::HostBlocks>>,
    pub storage: B::Cache,
    /// Blocks no sequence holds and that hold no cached prefix.
    free: Vec<u32>,
    /// Per block: how many sequences hold it.
    refs: Vec<u32>,
    /// None: the prefix cache is off and every block belongs to one sequence.
    prefix: Option<PrefixIndex>,
    /// Per block: a copy from the host into it has been issued and not yet awaited.
    importing: Vec<bool>,
    importing_count: usize,
    /// A block still importing was handed out to be written: the next flush orders the step
    /// after the copies, so that the copy cannot land on top of the new contents.
    await_before_write: bool,
    num_blocks: usize,
    block_size: usize,
}

/// Where a cached block of a prompt's prefix is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hit {
    /// In this device block.
    Device(u32),
    /// In this host tier slot.
    Host(u32),
}

/// What admission took from the prefix cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Admitted {
    /// Prompt tokens in the cache (device or host): not to be prefilled.
    pub cached_tokens: usize,
    /// Of those, tokens copied back from the host tier.
    pub restored_tokens: usize,
}

/// A copy to or from the host tier failed.
#[derive(Debug)]
pub struct TransferError {
    pub error: CoreError,
    /// Device blocks whose contents are unknown: the sequences holding them must not run.
    pub lost_blocks: Vec<u32>,
}

/// The blocks a sequence holds, in position order.
#[derive(Debug, Default, Clone)]
pub struct BlockTable {
    pub blocks: Vec<u32>,
    /// Chain ids of the leading full blocks that are in the prefix cache (taken from it, or
    /// registered once computed): the parent of the next block's key.
    chain: Vec<u64>,
}

impl<B: Backend> KvCache<B> {
    /// A cache with the prefix cache off (see [`KvCache::set_prefix_cache`]).
    pub fn new(
        backend: &B,
        cfg: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self> {
        if num_blocks == 0 || block_size == 0 {
            return Err(CoreError::Cache(
                "num_blocks and block_size must be positive".into(),
            ));
        }
        let num_blocks_u32 = u32::try_from(num_blocks).map_err(|_| {
            CoreError::Cache(format!("{num_blocks} blocks is more than a u32 can index"))
        })?;
        Ok(KvCache {
            host: None,
            storage: backend.new_cache(cfg, num_blocks, block_size)?,
            // Pop from the end: hand out low block ids first (nicer to read in logs).
            free: (0..num_blocks_u32).rev().collect(),
            refs: vec![0; num_blocks],
            prefix: None,
            importing: vec![false; num_blocks],
            importing_count: 0,
            await_before_write: false,
            num_blocks,
            block_size,
        })
    }

    /// Turns the prefix cache on or off; off forgets every cached prefix (the host tier's too,
    /// and turns the host tier off).
    pub fn set_prefix_cache(&mut self, on: bool) {
        match (on, self.prefix.is_some()) {
            (true, false) => self.prefix = Some(PrefixIndex::new(self.num_blocks)),
            (false, true) => {
                self.clear_prefix_cache();
                self.prefix = None;
                self.host = None;
            }
            _ => {}
        }
    }

    pub fn prefix_cache_enabled(&self) -> bool {
        self.prefix.is_some()
    }

    /// Gives the prefix cache a host-memory tier of at most `bytes` (whole blocks; 0 or too
    /// small for one block: none). Needs the prefix cache on. Returns the blocks it can hold.
    pub fn set_host_tier(&mut self, backend: &B, cfg: &ModelConfig, bytes: u64) -> Result<usize> {
        if self.prefix.is_none() {
            return Err(CoreError::Cache(
                "the host tier needs the prefix cache on".into(),
            ));
        }
        let block_bytes = backend.host_block_bytes(cfg, self.block_size).max(1);
        let slots = u32::try_from(bytes / block_bytes as u64).unwrap_or(u32::MAX);
        self.host = None;
        if slots > 0 {
            let storage = backend.new_host_blocks(cfg, self.block_size, slots as usize)?;
            self.host = Some(HostTier::new(storage, slots, block_bytes));
        }
        Ok(slots as usize)
    }

    /// Blocks the host tier can hold (0: no host tier).
    pub fn host_capacity_blocks(&self) -> usize {
        self.host.as_ref().map_or(0, HostTier::max_slots)
    }
    /// Blocks holding a cached prefix in the host tier.
    pub fn host_cached_blocks(&self) -> usize {
        self.host.as_ref().map_or(0, HostTier::cached_blocks)
    }
    /// Bytes one block takes in the host tier (0: no host tier).
    pub fn host_block_bytes(&self) -> usize {
        self.host.as_ref().map_or(0, HostTier::block_bytes)
    }
    /// The host tier's running totals (zero without one).
    pub fn host_stats(&self) -> HostTierStats {
        self.host
            .as_ref()
            .map_or_else(HostTierStats::default, HostTier::stats)
    }
    /// The host tier's storage, for measurements.
    pub fn host_storage_mut(&mut self) -> Option<&mut B::HostBlocks> {
        self.host.as_mut().map(HostTier::storage_mut)
    }

    /// Forgets every cached prefix, the host tier's too: blocks no sequence holds become free.
    pub fn clear_prefix_cache(&mut self) {
        if let Some(p) = self.prefix.as_mut() {
            self.free.extend(p.clear());
        }
        if let Some(h) = self.host.as_mut() {
            h.clear();
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
    /// Blocks a new sequence can take: free ones, and cached ones no sequence holds (evicted,
    /// least recently used first, when taken).
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.prefix.as_ref().map_or(0, PrefixIndex::evictable)
    }
    /// Blocks holding a cached prefix, held by sequences or not.
    pub fn cached_blocks(&self) -> usize {
        self.prefix.as_ref().map_or(0, PrefixIndex::cached_blocks)
    }
    /// Cached blocks evicted to make room so far (0 with the prefix cache off).
    pub fn evicted_blocks(&self) -> u64 {
        self.prefix.as_ref().map_or(0, PrefixIndex::evicted)
    }
    /// Total tokens the cache can hold.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks * self.block_size
    }

    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Whether `block` holds a cached prefix (its contents are final).
    pub fn is_cached(&self, block: u32) -> bool {
        self.prefix.as_ref().is_some_and(|p| p.is_cached(block))
    }

    /// Whether a sequence holding `block` may write into it: it holds it alone and it holds no
    /// cached prefix.
    pub fn is_writable(&self, block: u32) -> bool {
        self.refs.get(block as usize) == Some(&1) && !self.is_cached(block)
    }

    /// Whether a copy from the host into `block` may still be under way: no step may read it
    /// before [`KvCache::await_imports`].
    pub fn is_importing(&self, block: u32) -> bool {
        self.importing_count > 0 && self.importing.get(block as usize) == Some(&true)
    }
    /// Whether any copy from the host has been issued and not awaited.
    pub fn has_imports_in_flight(&self) -> bool {
        self.importing_count > 0
    }

    /// The cached blocks of the longest cached prefix of `prompt` that a new sequence may take,
    /// on the device or in the host tier, with their chain ids: whole blocks of at most
    /// `max_tokens` tokens, and never the block of the last prompt token, which must be computed
    /// to give logits (a fully cached prompt recomputes its last block into a block of its own
    /// rather than write into a shared one).
    fn lookup(&self, prompt: &[u32], max_tokens: usize) -> Vec<(Hit, u64)> {
        let Some(p) = self.prefix.as_ref() else {
            return Vec::new();
        };
        let usable = prompt.len().saturating_sub(1).min(max_tokens) / self.block_size;
        let mut parent = ROOT;
        let mut out = Vec::new();
        for chunk in prompt.chunks_exact(self.block_size).take(usable) {
            let hit = match p.get(parent, chunk) {
                Some((block, id)) => (Hit::Device(block), id),
                None => match self.host.as_ref().and_then(|h| h.get(parent, chunk)) {
                    Some((slot, id)) => (Hit::Host(slot), id),
                    None => break,
                },
            };
            out.push(hit);
            parent = hit.1;
        }
        out
    }

    /// Tokens of `prompt` a sequence admitted now would take from the prefix cache (at most
    /// `max_tokens`).
    pub fn cached_prefix_tokens(&self, prompt: &[u32], max_tokens: usize) -> usize {
        self.lookup(prompt, max_tokens).len() * self.block_size
    }

    /// Sets up an empty `table` for a sequence of `prompt` that may grow to `total_tokens`:
    /// takes the device blocks of the prompt's longest cached prefix (up to `max_cached_tokens`)
    /// by reference, gives each block of it that is in the host tier a device block of its own
    /// and plans its copy back (issued by [`KvCache::flush_transfers`], before any step), and
    /// allocates the rest. Returns what it took from the cache, or None (nothing changed) when
    /// the blocks it really needs are not available.
    pub fn admit(
        &mut self,
        table: &mut BlockTable,
        prompt: &[u32],
        total_tokens: usize,
        max_cached_tokens: usize,
    ) -> Option<Admitted> {
        debug_assert!(table.blocks.is_empty(), "admit takes an empty table");
        let hits = self.lookup(prompt, max_cached_tokens);
        let on_device = hits
            .iter()
            .filter(|h| matches!(h.0, Hit::Device(_)))
            .count();
        // A block restored from the host needs a device block like one to compute, but no prefill.
        let need = self.blocks_for(total_tokens).saturating_sub(on_device);
        // Cached blocks nobody holds count as available; taking them by reference uses them up.
        let parked = hits
            .iter()
            .filter(|h| matches!(h.0, Hit::Device(b) if self.refs[b as usize] == 0))
            .count();
        if need > self.free_blocks() - parked {
            return None;
        }
        // Hold every hit before taking a block: taking one may evict a parked device block or a
        // host slot, and must not evict a later block of this same prefix.
        for &(hit, _) in &hits {
            match hit {
                Hit::Device(b) => {
                    if self.refs[b as usize] == 0
                        && let Some(p) = self.prefix.as_mut()
                    {
                        p.unpark(b);
                    }
                    self.refs[b as usize] += 1;
                }
                Hit::Host(slot) => {
                    if let Some(h) = self.host.as_mut() {
                        h.pin(slot);
                    }
                }
            }
        }
        let mut parent = ROOT;
        let mut restored = 0;
        for (i, &(hit, id)) in hits.iter().enumerate() {
            let b = match hit {
                Hit::Device(b) => b,
                Hit::Host(slot) => {
                    // Free blocks were counted above, so this always finds one.
                    let b = self.take_block()?;
                    let chunk = &prompt[i * self.block_size..(i + 1) * self.block_size];
                    // Registered now, so that a sequence admitted after this one in the same
                    // round takes it by reference instead of restoring it twice.
                    if let Some(p) = self.prefix.as_mut() {
                        p.insert(parent, chunk, b, Some(id));
                    }
                    if let Some(h) = self.host.as_mut() {
                        h.plan_restore(slot, b);
                    }
                    restored += 1;
                    b
                }
            };
            table.blocks.push(b);
            table.chain.push(id);
            parent = id;
        }
        for _ in 0..need - restored {
            let b = self.take_block()?;
            table.blocks.push(b);
        }
        Some(Admitted {
            cached_tokens: hits.len() * self.block_size,
            restored_tokens: restored * self.block_size,
        })
    }

    /// A block for one sequence alone: a free one, else the least recently used cached one
    /// (whose prefix goes to the host tier, if there is one).
    fn take_block(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (b, held) = self.prefix.as_mut()?.evict()?;
                if let (Some(h), Some(held)) = (self.host.as_mut(), held) {
                    h.save(b, held);
                }
                b
            }
        };
        if self.is_importing(b) {
            self.await_before_write = true;
        }
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Issues the copies to and from the host tier that admission planned: out first, then back
    /// (see [`Backend::export_blocks`], [`Backend::import_blocks`]). Steps issued after this see
    /// the copies out done; the blocks copied back are importing until
    /// [`KvCache::await_imports`].
    ///
    /// On error the host tier forgets everything, and every block that was to be copied back
    /// forgets its prefix: the error lists them, and the sequences holding them must not run.
    pub fn flush_transfers(&mut self, backend: &B) -> std::result::Result<(), TransferError> {
        let Some(h) = self.host.as_mut() else {
            return Ok(());
        };
        let blocks = match h.flush(backend, &mut self.storage) {
            Ok(blocks) => blocks,
            Err((error, lost_blocks)) => return Err(self.lose(error, lost_blocks)),
        };
        for b in blocks {
            if let Some(f) = self.importing.get_mut(b as usize)
                && !*f
            {
                *f = true;
                self.importing_count += 1;
            }
        }
        if std::mem::take(&mut self.await_before_write) {
            self.await_imports(backend)?;
        }
        Ok(())
    }

    /// Orders every copy back issued so far before the next step; blocks stop importing. On
    /// error the blocks that were importing forget their prefix, and the error lists them.
    pub fn await_imports(&mut self, backend: &B) -> std::result::Result<(), TransferError> {
        if self.importing_count == 0 {
            return Ok(());
        }
        let importing: Vec<u32> = (0..self.num_blocks as u32)
            .filter(|&b| self.importing[b as usize])
            .collect();
        self.importing.iter_mut().for_each(|f| *f = false);
        self.importing_count = 0;
        if let Some(h) = self.host.as_mut()
            && let Err(error) = h.await_imports(backend, &mut self.storage)
        {
            if let Some(h) = self.host.as_mut() {
                h.clear();
            }
            return Err(self.lose(error, importing));
        }
        Ok(())
    }

    /// Blocks whose contents are unknown after a failed copy forget their prefix.
    fn lose(&mut self, error: CoreError, lost_blocks: Vec<u32>) -> TransferError {
        if let Some(p) = self.prefix.as_mut() {
            for &b in &lost_blocks {
                p.forget(b);
            }
        }
        TransferError { error, lost_blocks }
    }

    /// Grows `table` to hold `tokens` tokens; on failure nothing is allocated.
    pub fn reserve(&mut self, table: &mut BlockTable, tokens: usize) -> Result<()> {
        let need = self.blocks_for(tokens).saturating_sub(table.blocks.len());
        if need > self.free_blocks() {
            return Err(CoreError::Cache(format!(
                "needs {need} more blocks of {} tokens, only {} free",
                self.block_size,
                self.free_blocks()
            )));
        }
        for _ in 0..need {
            if let Some(b) = self.take_block() {
                table.blocks.push(b);
            }
        }
        Ok(())
    }

    /// Puts every full block of `table` whose `tokens` are all computed (the first `computed`
    /// of them are in the cache) into the prefix cache, so later sequences can take it.
    pub fn register_full_blocks(
        &mut self,
        table: &mut BlockTable,
        tokens: &[u32],
        computed: usize,
    ) {
        let Some(p) = self.prefix.as_mut() else {
            return;
        };
        let full = (computed.min(tokens.len()) / self.block_size).min(table.blocks.len());
        for i in table.chain.len()..full {
            let parent = table.chain.last().copied().unwrap_or(ROOT);
            let chunk = &tokens[i * self.block_size..(i + 1) * self.block_size];
            // A prefix the host tier holds keeps its chain id: the host blocks after it stay
            // reachable.
            let known = self
                .host
                .as_ref()
                .and_then(|h| h.get(parent, chunk))
                .map(|(_, id)| id);
            let id = p.insert(parent, chunk, table.blocks[i], known);
            table.chain.push(id);
        }
    }

    /// Lets go of every block of `table`: a block nobody holds any more becomes free, or stays
    /// cached until its room is needed. The last blocks of the sequence go first in eviction
    /// order, so a cached prefix loses its tail before its head.
    pub fn release(&mut self, table: &mut BlockTable) {
        for b in table.blocks.drain(..).rev() {
            let r = &mut self.refs[b as usize];
            *r = r.saturating_sub(1);
            if *r > 0 {
                continue;
            }
            match self.prefix.as_mut() {
                Some(p) if p.is_cached(b) => p.park(b),
                _ => self.free.push(b),
            }
        }
        table.chain.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;

    fn cache(blocks: usize) -> KvCache<CpuBackend> {
        let cfg = ModelConfig::from_json_str(&crate::tiny::config_json().to_string()).unwrap();
        let mut c = KvCache::new(&CpuBackend, &cfg, blocks, 4).unwrap();
        c.set_prefix_cache(true);
        c
    }

    /// Admits `prompt` and marks it computed; returns the table and the cached tokens.
    fn run(c: &mut KvCache<CpuBackend>, prompt: &[u32], total: usize) -> (BlockTable, usize) {
        let mut t = BlockTable::default();
        let hit = c.admit(&mut t, prompt, total, usize::MAX).expect("room");
        c.flush_transfers(&CpuBackend).expect("copies");
        c.register_full_blocks(&mut t, prompt, prompt.len());
        (t, hit.cached_tokens)
    }

    #[test]
    fn a_shared_prefix_is_taken_by_reference() {
        let mut c = cache(8);
        let a: Vec<u32> = (0..10).collect();
        let (ta, hit) = run(&mut c, &a, 10);
        assert_eq!(hit, 0);
        assert_eq!(c.cached_blocks(), 2, "two full blocks of 4");
        let b: Vec<u32> = (0..9).chain([99]).collect();
        let (tb, hit) = run(&mut c, &b, 12);
        assert_eq!(hit, 8);
        assert_eq!(tb.blocks[..2], ta.blocks[..2]);
        assert_ne!(tb.blocks[2], ta.blocks[2]);
        assert!(!c.is_writable(ta.blocks[0]) && !c.is_writable(ta.blocks[1]));
        assert!(c.is_writable(tb.blocks[2]));
        // 3 blocks for a, 1 more for b
        assert_eq!(c.free_blocks(), 4);
        let mut t = BlockTable::default();
        assert_eq!(
            c.admit(&mut t, &b, 12, 5).map(|a| a.cached_tokens),
            Some(4),
            "whole blocks of at most 5 tokens"
        );
    }

    #[test]
    fn a_different_earlier_block_breaks_the_chain() {
        let mut c = cache(8);
        let (_, _) = run(&mut c, &[1, 2, 3, 4, 5, 6, 7, 8, 9], 9);
        // same second block, different first one: no hit at all
        let (_, hit) = run(&mut c, &[0, 2, 3, 4, 5, 6, 7, 8, 9], 9);
        assert_eq!(hit, 0);
    }

    #[test]
    fn a_fully_cached_prompt_recomputes_its_last_block() {
        let mut c = cache(8);
        let p: Vec<u32> = (0..8).collect();
        let (ta, _) = run(&mut c, &p, 8);
        let (tb, hit) = run(&mut c, &p, 9);
        assert_eq!(hit, 4, "the block holding the last token is not taken");
        assert_eq!(tb.blocks[0], ta.blocks[0]);
        assert_ne!(tb.blocks[1], ta.blocks[1]);
        assert!(
            c.is_writable(tb.blocks[1]),
            "the recomputed block is private"
        );
        assert_eq!(c.cached_blocks(), 2, "a duplicate is not registered twice");
    }

    #[test]
    fn unheld_blocks_stay_cached_and_are_evicted_lru_tail_first() {
        let mut c = cache(4);
        let a: Vec<u32> = (0..8).collect();
        let (mut ta, _) = run(&mut c, &a, 8);
        c.release(&mut ta);
        assert_eq!((c.free_blocks(), c.cached_blocks()), (4, 2));
        // Three new blocks: two free ones, then the evicted tail of a.
        let (mut tb, hit) = run(&mut c, &[50, 51, 52, 53, 54, 55, 56, 57, 58, 59], 12);
        assert_eq!(hit, 0);
        assert_eq!(c.cached_blocks(), 1 + 2, "a's head and b's two full blocks");
        c.release(&mut tb);
        let (_, hit) = run(&mut c, &[0, 1, 2, 3, 4, 5], 6);
        assert_eq!(hit, 4, "a's first block survived");
    }

    #[test]
    fn admission_counts_only_the_blocks_it_needs() {
        let mut c = cache(4);
        let p: Vec<u32> = (0..13).collect();
        let (_ta, _) = run(&mut c, &p, 16); // all 4 blocks, 3 of them cached
        assert_eq!(c.free_blocks(), 0);
        let mut t = BlockTable::default();
        assert_eq!(
            c.admit(&mut t, &p, 16, usize::MAX),
            None,
            "needs 1 block, none free"
        );
        assert!(t.blocks.is_empty());
        let mut c = cache(5);
        let (_ta, _) = run(&mut c, &p, 16);
        let (tb, hit) = run(&mut c, &p, 16);
        assert_eq!((hit, tb.blocks.len(), c.free_blocks()), (12, 4, 0));
    }

    #[test]
    fn clearing_and_turning_off_free_every_unheld_block() {
        let mut c = cache(4);
        let (mut t, _) = run(&mut c, &(0..8).collect::<Vec<_>>(), 8);
        c.release(&mut t);
        c.clear_prefix_cache();
        assert_eq!((c.free_blocks(), c.cached_blocks()), (4, 0));
        let (mut t, _) = run(&mut c, &(0..8).collect::<Vec<_>>(), 8);
        c.release(&mut t);
        c.set_prefix_cache(false);
        assert_eq!((c.free_blocks(), c.cached_blocks()), (4, 0));
        let mut t = BlockTable::default();
        assert_eq!(
            c.admit(&mut t, &[0, 1, 2, 3, 4], 5, usize::MAX)
                .map(|a| a.cached_tokens),
            Some(0)
        );
    }

    /// A cache of `blocks` device blocks of 4 tokens with a host tier of `slots` blocks.
    fn tiered(blocks: usize, slots: u64) -> KvCache<CpuBackend> {
        let cfg = ModelConfig::from_json_str(&crate::tiny::config_json().to_string()).unwrap();
        let mut c = KvCache::new(&CpuBackend, &cfg, blocks, 4).unwrap();
        c.set_prefix_cache(true);
        let bytes = CpuBackend.host_block_bytes(&cfg, 4) as u64;
        assert_eq!(
            c.set_host_tier(&CpuBackend, &cfg, slots * bytes + bytes / 2)
                .unwrap(),
            slots as usize
        );
        c
    }

    /// Admits `prompt` (at most `max_cached` tokens from the cache), issues the copies and
    /// marks it computed.
    fn run_at_most(
        c: &mut KvCache<CpuBackend>,
        prompt: &[u32],
        total: usize,
        max_cached: usize,
    ) -> (BlockTable, Admitted) {
        let mut t = BlockTable::default();
        let got = c.admit(&mut t, prompt, total, max_cached).expect("room");
        c.flush_transfers(&CpuBackend).expect("copies");
        c.await_imports(&CpuBackend).expect("copies");
        c.register_full_blocks(&mut t, prompt, prompt.len());
        (t, got)
    }

    fn seq(from: u32, n: u32) -> Vec<u32> {
        (from..from + n).collect()
    }

    #[test]
    fn evicted_blocks_go_to_the_host_and_come_back_into_fresh_blocks() {
        let mut c = tiered(4, 16);
        let a = seq(0, 9);
        let (mut ta, _) = run_at_most(&mut c, &a, 9, usize::MAX);
        c.release(&mut ta);
        // b takes all four blocks: a's two cached blocks are evicted to the host.
        let (mut tb, _) = run_at_most(&mut c, &seq(100, 16), 16, usize::MAX);
        assert_eq!(c.host_cached_blocks(), 2);
        assert_eq!(c.host_stats().saved_blocks, 2);
        assert_eq!(c.cached_blocks(), 4, "b's blocks; a's are on the host only");
        c.release(&mut tb);
        // a again: both blocks from the host, into device blocks of its own (b's go to the host).
        let mut t = BlockTable::default();
        let got = c.admit(&mut t, &a, 9, usize::MAX).unwrap();
        assert_eq!(
            got,
            Admitted {
                cached_tokens: 8,
                restored_tokens: 8
            }
        );
        assert_eq!(c.host_stats().restored_blocks, 0, "planned, not issued");
        c.flush_transfers(&CpuBackend).unwrap();
        assert!(t.blocks[..2].iter().all(|&b| c.is_importing(b)));
        assert!(!c.is_importing(t.blocks[2]));
        assert_eq!(c.host_stats().restored_blocks, 2);
        assert_eq!(c.host_stats().restores, 1, "one batch");
        assert_eq!(
            c.host_stats().saved_blocks,
            2 + 3,
            "three of b's blocks made room"
        );
        assert!(
            t.blocks[..2]
                .iter()
                .all(|&b| c.is_cached(b) && !c.is_writable(b))
        );
        c.await_imports(&CpuBackend).unwrap();
        assert!(!c.has_imports_in_flight());
        // The restored blocks are cached on the device again: another copy of a takes them.
        let (t3, got) = run_at_most(&mut c, &a, 9, usize::MAX);
        assert_eq!(
            got,
            Admitted {
                cached_tokens: 8,
                restored_tokens: 0
            }
        );
        assert_eq!(t3.blocks[..2], t.blocks[..2]);
    }

    #[test]
    fn a_prefix_can_be_partly_on_the_device_and_partly_on_the_host() {
        let mut c = tiered(4, 16);
        let a = seq(0, 13);
        let (mut ta, _) = run_at_most(&mut c, &a, 13, usize::MAX);
        c.release(&mut ta);
        // Two new blocks: the free one, and a's last cached block (the tail goes first).
        let (mut tb, _) = run_at_most(&mut c, &seq(100, 3), 8, usize::MAX);
        assert_eq!((c.host_cached_blocks(), c.cached_blocks()), (1, 2));
        c.release(&mut tb);
        let (_, got) = run_at_most(&mut c, &a, 13, usize::MAX);
        assert_eq!(
            got,
            Admitted {
                cached_tokens: 12,
                restored_tokens: 4
            }
        );
    }

    #[test]
    fn a_recomputed_block_keeps_its_chain_id_so_the_host_blocks_after_it_stay_reachable() {
        let mut c = tiered(4, 16);
        let a = seq(0, 9);
        let (mut ta, _) = run_at_most(&mut c, &a, 9, usize::MAX);
        c.release(&mut ta);
        let (mut tb, _) = run_at_most(&mut c, &seq(100, 16), 16, usize::MAX);
        c.release(&mut tb);
        assert_eq!(c.host_cached_blocks(), 2);
        // Computes a's first block again instead of restoring it (as with prompt logprobs).
        let (mut tc, got) = run_at_most(&mut c, &a[..5], 5, 0);
        assert_eq!(got.cached_tokens, 0);
        let recomputed = tc.blocks[0];
        c.release(&mut tc);
        // a's second block, on the host, chains onto the recomputed first one.
        let (t, got) = run_at_most(&mut c, &a, 9, usize::MAX);
        assert_eq!(
            got,
            Admitted {
                cached_tokens: 8,
                restored_tokens: 4
            }
        );
        assert_eq!(t.blocks[0], recomputed);
    }

    #[test]
    fn the_host_tier_is_lru_bounded() {
        let mut c = tiered(2, 2);
        // Three single-block prefixes, each evicted from the device by the next two.
        for p in 0..4u32 {
            let (mut t, _) = run_at_most(&mut c, &seq(p * 100, 5), 8, usize::MAX);
            c.release(&mut t);
        }
        assert_eq!(c.host_cached_blocks(), 2);
        assert_eq!(c.host_stats().evicted_blocks, 1);
        // Prefix 0 is gone, 1 on the host, 3 on the device.
        let hit = |c: &KvCache<CpuBackend>, p: u32| c.cached_prefix_tokens(&seq(p * 100, 5), 8);
        assert_eq!((hit(&c, 0), hit(&c, 1), hit(&c, 3)), (0, 4, 4));
    }

    #[test]
    fn a_slot_being_restored_is_not_evicted_by_the_same_round() {
        let mut c = tiered(2, 1);
        let (mut t, _) = run_at_most(&mut c, &seq(0, 5), 5, usize::MAX);
        c.release(&mut t);
        let (mut t, _) = run_at_most(&mut c, &seq(100, 8), 8, usize::MAX);
        assert_eq!(c.host_cached_blocks(), 1, "prefix 0 went to the only slot");
        c.release(&mut t);
        // Restoring prefix 0 takes the device's two parked blocks of prefix 100, which can go
        // nowhere: the only slot is being read back in this round.
        let (_, got) = run_at_most(&mut c, &seq(0, 5), 8, usize::MAX);
        assert_eq!(got.restored_tokens, 4);
        assert_eq!(c.cached_prefix_tokens(&seq(100, 5), 8), 0);
        assert_eq!(c.cached_prefix_tokens(&seq(0, 5), 8), 4);
    }

    #[test]
    fn clearing_the_prefix_cache_clears_the_host_tier_and_turning_it_off_drops_it() {
        let mut c = tiered(2, 4);
        let (mut t, _) = run_at_most(&mut c, &seq(0, 5), 5, usize::MAX);
        c.release(&mut t);
        let (mut t, _) = run_at_most(&mut c, &seq(100, 8), 8, usize::MAX);
        c.release(&mut t);
        assert_eq!(c.host_cached_blocks(), 1);
        c.clear_prefix_cache();
        assert_eq!(
            (
                c.host_cached_blocks(),
                c.cached_prefix_tokens(&seq(0, 5), 8)
            ),
            (0, 0)
        );
        c.set_prefix_cache(false);
        assert_eq!(c.host_capacity_blocks(), 0);
    }
}
