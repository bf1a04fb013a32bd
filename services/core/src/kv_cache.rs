//! The paged latent KV cache: fixed-size blocks handed out from a free list, a block table per
//! sequence. Storage lives in the backend; this owns only the bookkeeping.

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::error::{CoreError, Result};

pub struct KvCache<B: Backend> {
    pub storage: B::Cache,
    free: Vec<u32>,
    num_blocks: usize,
    block_size: usize,
}

/// The blocks a sequence owns, in position order.
#[derive(Debug, Default, Clone)]
pub struct BlockTable {
    pub blocks: Vec<u32>,
}

impl<B: Backend> KvCache<B> {
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
            num_blocks,
            block_size,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }
    /// Total tokens the cache can hold.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks * self.block_size
    }

    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Grows `table` to hold `tokens` tokens; on failure nothing is allocated.
    pub fn reserve(&mut self, table: &mut BlockTable, tokens: usize) -> Result<()> {
        let need = self.blocks_for(tokens).saturating_sub(table.blocks.len());
        if need > self.free.len() {
            return Err(CoreError::Cache(format!(
                "needs {need} more blocks of {} tokens, only {} free",
                self.block_size,
                self.free.len()
            )));
        }
        for _ in 0..need {
            if let Some(b) = self.free.pop() {
                table.blocks.push(b);
            }
        }
        Ok(())
    }

    /// Returns every block of `table` to the pool.
    pub fn release(&mut self, table: &mut BlockTable) {
        self.free.append(&mut table.blocks);
    }
}
