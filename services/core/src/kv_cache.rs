//! The paged latent KV cache: fixed-size blocks with reference counts, a block table per
//! sequence, and the prefix cache that lets sequences share the full blocks of a common prefix.
//! Storage lives in the backend; this owns only the bookkeeping (backends see block tables only).
//!
//! Invariant: a sequence writes only into blocks it holds alone that hold no cached prefix
//! ([`KvCache::is_writable`]). A shared or cached block is full and its contents are final, so
//! a block is never changed while another sequence reads it.

mod prefix;

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::error::{CoreError, Result};
use prefix::{PrefixIndex, ROOT};

pub struct KvCache<B: Backend> {
    pub storage: B::Cache,
    /// Blocks no sequence holds and that hold no cached prefix.
    free: Vec<u32>,
    /// Per block: how many sequences hold it.
    refs: Vec<u32>,
    /// None: the prefix cache is off and every block belongs to one sequence.
    prefix: Option<PrefixIndex>,
    num_blocks: usize,
    block_size: usize,
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
            storage: backend.new_cache(cfg, num_blocks, block_size)?,
            // Pop from the end: hand out low block ids first (nicer to read in logs).
            free: (0..num_blocks_u32).rev().collect(),
            refs: vec![0; num_blocks],
            prefix: None,
            num_blocks,
            block_size,
        })
    }

    /// Turns the prefix cache on or off; off forgets every cached prefix.
    pub fn set_prefix_cache(&mut self, on: bool) {
        match (on, self.prefix.is_some()) {
            (true, false) => self.prefix = Some(PrefixIndex::new(self.num_blocks)),
            (false, true) => {
                self.clear_prefix_cache();
                self.prefix = None;
            }
            _ => {}
        }
    }

    pub fn prefix_cache_enabled(&self) -> bool {
        self.prefix.is_some()
    }

    /// Forgets every cached prefix: blocks no sequence holds become free.
    pub fn clear_prefix_cache(&mut self) {
        if let Some(p) = self.prefix.as_mut() {
            self.free.extend(p.clear());
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

    /// The cached blocks of the longest cached prefix of `prompt` that a new sequence may take:
    /// whole blocks of at most `max_tokens` tokens, and never the block of the last prompt
    /// token, which must be computed to give logits (a fully cached prompt recomputes its last
    /// block into a block of its own rather than write into a shared one).
    fn lookup(&self, prompt: &[u32], max_tokens: usize) -> Vec<(u32, u64)> {
        let Some(p) = self.prefix.as_ref() else {
            return Vec::new();
        };
        let usable = prompt.len().saturating_sub(1).min(max_tokens) / self.block_size;
        let mut parent = ROOT;
        let mut out = Vec::new();
        for chunk in prompt.chunks_exact(self.block_size).take(usable) {
            let Some((block, id)) = p.get(parent, chunk) else {
                break;
            };
            out.push((block, id));
            parent = id;
        }
        out
    }

    /// Tokens of `prompt` a sequence admitted now would take from the prefix cache (at most
    /// `max_tokens`).
    pub fn cached_prefix_tokens(&self, prompt: &[u32], max_tokens: usize) -> usize {
        self.lookup(prompt, max_tokens).len() * self.block_size
    }

    /// Sets up an empty `table` for a sequence of `prompt` that may grow to `total_tokens`:
    /// takes the cached blocks of the prompt's longest cached prefix (up to `max_cached_tokens`)
    /// by reference and allocates the rest. Returns the number of prompt tokens already in the
    /// cache, or None (nothing changed) when the blocks it really needs are not available.
    pub fn admit(
        &mut self,
        table: &mut BlockTable,
        prompt: &[u32],
        total_tokens: usize,
        max_cached_tokens: usize,
    ) -> Option<usize> {
        debug_assert!(table.blocks.is_empty(), "admit takes an empty table");
        let hit = self.lookup(prompt, max_cached_tokens);
        let need = self.blocks_for(total_tokens).saturating_sub(hit.len());
        // Cached blocks nobody holds count as available; taking them by reference uses them up.
        let parked = hit
            .iter()
            .filter(|&&(b, _)| self.refs[b as usize] == 0)
            .count();
        if need > self.free_blocks() - parked {
            return None;
        }
        for &(b, id) in &hit {
            if self.refs[b as usize] == 0
                && let Some(p) = self.prefix.as_mut()
            {
                p.unpark(b);
            }
            self.refs[b as usize] += 1;
            table.blocks.push(b);
            table.chain.push(id);
        }
        for _ in 0..need {
            let b = self.take_block()?;
            table.blocks.push(b);
        }
        Some(hit.len() * self.block_size)
    }

    /// A block for one sequence alone: a free one, else the least recently used cached one.
    fn take_block(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => self.prefix.as_mut()?.evict()?,
        };
        self.refs[b as usize] = 1;
        Some(b)
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
            let id = p.insert(parent, chunk, table.blocks[i]);
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
        c.register_full_blocks(&mut t, prompt, prompt.len());
        (t, hit)
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
            c.admit(&mut t, &b, 12, 5),
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
        assert_eq!(c.admit(&mut t, &[0, 1, 2, 3, 4], 5, usize::MAX), Some(0));
    }
}
