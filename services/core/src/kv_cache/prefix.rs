//! The prefix cache's index over full KV blocks: which block holds which chain of token ids, and
//! which blocks no sequence holds any more, evicted least recently used first. Bookkeeping only.
//!
//! A full block is named by a hash chained over its token ids: hash(parent's chain id, its ids),
//! where the parent is the prefix before it. Equal ids at equal positions after an equal prefix
//! give equal contents, whatever the backend. Chain ids are handed out fresh for every prefix
//! registered (never a hash), and a hit compares the parent id and the ids themselves, so a hash
//! collision can cost a hit but never hand a sequence the wrong contents.
//!
//! The same index serves both tiers of the cache: over device blocks, and over the host tier's
//! slots (kv_cache/host.rs). A prefix keeps its chain id when it moves between them, so the blocks
//! after it still chain onto it wherever they are cached.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

/// Chain id of the empty prefix: the parent of every sequence's first block.
pub(crate) const ROOT: u64 = 0;

/// A cached prefix's last block: what an evicted block held, enough to cache it in another tier.
pub(crate) struct Entry {
    block: u32,
    /// Chain id of the prefix that ends with this block.
    pub(crate) id: u64,
    pub(crate) parent: u64,
    pub(crate) tokens: Box<[u32]>,
}

pub(crate) struct PrefixIndex {
    by_hash: HashMap<u64, Entry>,
    /// Per block: the hash it is registered under while it holds a cached prefix.
    hash_of: Vec<Option<u64>>,
    /// Per block: its stamp in `lru` while no sequence holds it.
    stamp_of: Vec<Option<u64>>,
    /// Cached blocks no sequence holds, oldest stamp first.
    lru: BTreeSet<(u64, u32)>,
    next_id: u64,
    clock: u64,
    evicted: u64,
}

fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl PrefixIndex {
    pub(crate) fn new(num_blocks: usize) -> Self {
        PrefixIndex {
            by_hash: HashMap::new(),
            hash_of: vec![None; num_blocks],
            stamp_of: vec![None; num_blocks],
            lru: BTreeSet::new(),
            next_id: ROOT + 1,
            clock: 0,
            evicted: 0,
        }
    }

    /// The cached block holding `tokens` right after the prefix `parent`: (block, chain id).
    pub(crate) fn get(&self, parent: u64, tokens: &[u32]) -> Option<(u32, u64)> {
        self.by_hash
            .get(&chain_hash(parent, tokens))
            .filter(|e| e.parent == parent && *e.tokens == *tokens)
            .map(|e| (e.block, e.id))
    }

    /// Records that `block` holds `tokens` after the prefix `parent`, and returns the chain id of
    /// the prefix it ends: `known`, the id the prefix has in another tier, else a fresh one. If
    /// another block already holds that prefix, its id is returned and `block` stays unregistered
    /// (private to its sequence, freed with it).
    pub(crate) fn insert(
        &mut self,
        parent: u64,
        tokens: &[u32],
        block: u32,
        known: Option<u64>,
    ) -> u64 {
        if let Some((_, id)) = self.get(parent, tokens) {
            return id;
        }
        let id = known.unwrap_or_else(|| {
            self.next_id += 1;
            self.next_id - 1
        });
        let h = chain_hash(parent, tokens);
        let slot = self.hash_of.get_mut(block as usize);
        // A colliding hash of other contents keeps its block; this prefix just goes uncached.
        if let (Some(slot), false) = (slot, self.by_hash.contains_key(&h)) {
            *slot = Some(h);
            self.by_hash.insert(
                h,
                Entry {
                    block,
                    id,
                    parent,
                    tokens: tokens.into(),
                },
            );
        }
        id
    }

    pub(crate) fn is_cached(&self, block: u32) -> bool {
        self.hash_of
            .get(block as usize)
            .is_some_and(|h| h.is_some())
    }

    /// Blocks holding a cached prefix, held by sequences or not.
    pub(crate) fn cached_blocks(&self) -> usize {
        self.by_hash.len()
    }

    /// Cached blocks no sequence holds: free for the taking, at the price of their contents.
    pub(crate) fn evictable(&self) -> usize {
        self.lru.len()
    }

    /// Blocks evicted so far.
    pub(crate) fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Makes room for blocks `0..n` (the host tier's slots are handed out as it fills).
    pub(crate) fn grow(&mut self, n: usize) {
        if n > self.hash_of.len() {
            self.hash_of.resize(n, None);
            self.stamp_of.resize(n, None);
        }
    }

    /// A cached block that no sequence holds any more: evictable from now on, after every block
    /// parked before it (parked again, it moves to the back).
    pub(crate) fn park(&mut self, block: u32) {
        self.clock += 1;
        if let Some(s) = self.stamp_of.get_mut(block as usize) {
            if let Some(old) = s.replace(self.clock) {
                self.lru.remove(&(old, block));
            }
            self.lru.insert((self.clock, block));
        }
    }

    /// Whether `block` is cached and evictable (parked).
    pub(crate) fn is_parked(&self, block: u32) -> bool {
        self.stamp_of
            .get(block as usize)
            .is_some_and(|s| s.is_some())
    }

    /// A parked block taken by a sequence again.
    pub(crate) fn unpark(&mut self, block: u32) {
        if let Some(stamp) = self.stamp_of.get_mut(block as usize).and_then(Option::take) {
            self.lru.remove(&(stamp, block));
        }
    }

    /// Evicts the least recently parked block: it forgets its prefix and is returned for reuse,
    /// with what it held (always, as a parked block is registered).
    pub(crate) fn evict(&mut self) -> Option<(u32, Option<Entry>)> {
        let (_, block) = self.lru.pop_first()?;
        self.stamp_of[block as usize] = None;
        self.evicted += 1;
        let held = self.hash_of[block as usize]
            .take()
            .and_then(|h| self.by_hash.remove(&h));
        Some((block, held))
    }

    /// Forgets the prefix `block` holds, parked or not (its contents are not to be trusted).
    pub(crate) fn forget(&mut self, block: u32) {
        if let Some(stamp) = self.stamp_of.get_mut(block as usize).and_then(Option::take) {
            self.lru.remove(&(stamp, block));
        }
        if let Some(h) = self.hash_of.get_mut(block as usize).and_then(Option::take) {
            self.by_hash.remove(&h);
        }
    }

    /// Forgets every cached prefix; returns the parked blocks, which are plain free blocks now.
    pub(crate) fn clear(&mut self) -> Vec<u32> {
        let parked = self.lru.iter().map(|&(_, b)| b).collect();
        self.lru.clear();
        self.by_hash.clear();
        self.hash_of.iter_mut().for_each(|h| *h = None);
        self.stamp_of.iter_mut().for_each(|s| *s = None);
        parked
    }
}
