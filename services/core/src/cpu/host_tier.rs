//! The CPU backend's host tier storage: the device cache is host memory already, so copies are
//! plain memcpys, done by the time the call returns (nothing to overlap or await).

use super::{CpuCache, err};
use crate::backend::BlockCopy;
use crate::error::Result;

/// Slots of one block of every layer, slot-major: [slot][layer][block_size × width] f32.
pub struct CpuHostBlocks {
    data: Vec<f32>,
    layers: usize,
    /// f32 values of one layer's block.
    block_elems: usize,
    max_slots: usize,
}

impl CpuHostBlocks {
    pub(super) fn new(layers: usize, block_elems: usize, max_slots: usize) -> Result<Self> {
        layers
            .checked_mul(block_elems)
            .and_then(|v| v.checked_mul(max_slots))
            .ok_or_else(|| err("host tier size overflows"))?;
        Ok(CpuHostBlocks {
            data: Vec::new(),
            layers,
            block_elems,
            max_slots,
        })
    }

    fn slot_elems(&self) -> usize {
        self.layers * self.block_elems
    }

    /// Checks that `cache` is the shape this storage was made for and `c` is in range.
    fn check(&self, cache: &CpuCache, c: &BlockCopy) -> Result<()> {
        if cache.layers.len() != self.layers {
            return Err(err(format!(
                "host tier made for {} layers, cache has {}",
                self.layers,
                cache.layers.len()
            )));
        }
        if c.slot as usize >= self.max_slots {
            return Err(err(format!(
                "host slot {} out of {}",
                c.slot, self.max_slots
            )));
        }
        let end = (c.block as usize + 1) * self.block_elems;
        if cache.layers.iter().any(|l| l.len() < end) {
            return Err(err(format!("cache block {} out of range", c.block)));
        }
        Ok(())
    }

    pub(super) fn export(&mut self, cache: &CpuCache, copies: &[BlockCopy]) -> Result<()> {
        let (se, be) = (self.slot_elems(), self.block_elems);
        for c in copies {
            self.check(cache, c)?;
            let at = c.slot as usize * se;
            if self.data.len() < at + se {
                // Grows as slots are first used, by whole slots.
                self.data.resize(at + se, 0.0);
            }
            for (l, layer) in cache.layers.iter().enumerate() {
                let src = &layer[c.block as usize * be..(c.block as usize + 1) * be];
                self.data[at + l * be..at + (l + 1) * be].copy_from_slice(src);
            }
        }
        Ok(())
    }

    pub(super) fn import(&self, cache: &mut CpuCache, copies: &[BlockCopy]) -> Result<()> {
        let (se, be) = (self.slot_elems(), self.block_elems);
        for c in copies {
            self.check(cache, c)?;
            let at = c.slot as usize * se;
            let src = self
                .data
                .get(at..at + se)
                .ok_or_else(|| err(format!("host slot {} was never written", c.slot)))?;
            for (l, layer) in cache.layers.iter_mut().enumerate() {
                layer[c.block as usize * be..(c.block as usize + 1) * be]
                    .copy_from_slice(&src[l * be..(l + 1) * be]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(blocks: usize, block_elems: usize) -> CpuCache {
        CpuCache {
            layers: (0..3)
                .map(|l| {
                    (0..blocks * block_elems)
                        .map(|i| (l * 1000 + i) as f32)
                        .collect()
                })
                .collect(),
            width: block_elems,
        }
    }

    #[test]
    fn blocks_come_back_where_they_are_put_in_every_layer() {
        let src = cache(4, 5);
        let mut host = CpuHostBlocks::new(3, 5, 3).unwrap();
        let out = [
            BlockCopy { block: 3, slot: 2 },
            BlockCopy { block: 1, slot: 0 },
        ];
        host.export(&src, &out).unwrap();
        let mut dst = cache(4, 5);
        dst.layers.iter_mut().for_each(|l| l.fill(-1.0));
        let back = [
            BlockCopy { block: 0, slot: 2 },
            BlockCopy { block: 2, slot: 0 },
        ];
        host.import(&mut dst, &back).unwrap();
        for l in 0..3 {
            assert_eq!(dst.layers[l][0..5], src.layers[l][15..20], "layer {l}");
            assert_eq!(dst.layers[l][10..15], src.layers[l][5..10], "layer {l}");
            assert!(dst.layers[l][5..10].iter().all(|&v| v == -1.0), "untouched");
        }
    }

    #[test]
    fn out_of_range_copies_are_errors() {
        let c = cache(2, 5);
        let mut host = CpuHostBlocks::new(3, 5, 2).unwrap();
        assert!(host.export(&c, &[BlockCopy { block: 2, slot: 0 }]).is_err());
        assert!(host.export(&c, &[BlockCopy { block: 0, slot: 2 }]).is_err());
        let mut c = c;
        // slot 1 was never written
        assert!(
            host.import(&mut c, &[BlockCopy { block: 0, slot: 1 }])
                .is_err()
        );
    }
}
