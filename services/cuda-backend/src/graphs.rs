//! CUDA graphs for decode steps: the device work of a whole step (embedding, every layer, the
//! last hidden state) recorded once per shape and replayed, so that a step costs one launch
//! instead of ~20 per layer. At batch 1 a step's kernels each run a few microseconds, about what
//! the host needs to launch one, so eager decode leaves the GPU waiting on the host (V2-Lite's
//! 27 layers: 3× its weight-read roofline, bench/RESULTS.md).
//!
//! How a recorded step stays valid for later steps:
//! - Shapes are bucketed: the batch is padded to a power of two (1, 2, 4, ... 256 rows) with
//!   copies of its first sequence (`StepInput::padded_decode`: they recompute that sequence's
//!   token and write the same values to the same cache slot, so they change nothing), and every
//!   block list is padded with block 0 to a power-of-two width of at least [`MIN_TABLE_BLOCKS`].
//!   A graph is kept per (cache, rows, width).
//! - Everything a step uploads (token ids, positions, cache slots, block table, lengths) goes
//!   through `CudaBackend::upload_i32/i64` under a fixed key. While a graph is recorded those calls
//!   return fixed buffers made beforehand from the same step ([`staged`]), after checking that the
//!   layer code asks for exactly what was staged; a replay writes the new step's values into
//!   those buffers and launches. The attention kernels read lengths on the device and choose
//!   their splits from the table width, so nothing else in a step depends on host values.
//! - The first step of a shape runs eagerly (and is the step's result): it makes what is made
//!   lazily on first use (expert address tables, the RoPE table, cuBLAS's kernels), so that the
//!   recording that follows allocates nothing outside the graph. A RoPE table that grows later
//!   (longer contexts) drops every graph, which read the old one.
//! - Anything the recording cannot take (an op that syncs with the host or uploads another
//!   array) ends the recording with an error: graphs are then switched off for the process with a
//!   warning, and steps run eagerly as before.
//!
//! `DSV2_CUDA_GRAPHS=0` turns them off (to compare, or to diagnose); `DSV2_PROFILE` does too
//! (its per-op timers synchronise the stream, which a recording cannot contain).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::CudaGraph;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use half::bf16;

use dsv2_core::backend::{DecodeLayers, GraphStep};
use dsv2_core::error::Result;
use dsv2_core::model::StepInput;
use dsv2_kernels::Tensor;

use crate::attention::{
    self, BLOCK_TABLE, CACHE_SLOTS, POSITIONS, SEQ_LENS, decode_tables, row_positions,
};
use crate::{CudaAct, CudaBackend, CudaCache, Kx, TOKEN_IDS, err};

/// Largest batch recorded; bigger decode batches run eagerly (their kernels are long enough that
/// launch gaps matter little).
pub(crate) const MAX_GRAPH_ROWS: usize = 256;
/// Smallest block-table width recorded (512 tokens at block size 16): fewer, reusable graphs.
pub(crate) const MIN_TABLE_BLOCKS: usize = 32;

/// Environment switch: `0` runs every step eagerly.
pub(crate) const ENV: &str = "DSV2_CUDA_GRAPHS";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Shape {
    /// The cache the graph's layers read and write ([`CudaCache`]'s unique id).
    cache: u64,
    rows: usize,
    table_blocks: usize,
}

/// A recorded graph's fixed input buffers, by upload key.
pub(crate) type GraphInputs<T> = HashMap<&'static str, Arc<Tensor<T>>>;

/// One recorded step: the graph, the fixed buffers it reads its inputs from and the one it
/// leaves the hidden states in.
struct Recorded {
    graph: CudaGraph,
    inputs_i32: GraphInputs<i32>,
    inputs_i64: GraphInputs<i64>,
    hidden: Tensor<bf16>,
}

// SAFETY: a CudaGraph is only touched under the backend's `graphs` mutex (recording, replay and
// drop), which serialises the accesses the driver requires to be serialised.
unsafe impl Send for Recorded {}

/// The recorded decode graphs of one backend.
pub(crate) struct DecodeGraphs {
    on: bool,
    recorded: HashMap<Shape, Recorded>,
    /// RoPE table generation the graphs read.
    rope_generation: u64,
    /// The cache the graphs were recorded on.
    cache: u64,
    replays: u64,
}

impl DecodeGraphs {
    pub(crate) fn from_env(profiling: bool) -> Self {
        DecodeGraphs {
            on: !profiling && std::env::var(ENV).map_or(true, |v| v != "0"),
            recorded: HashMap::new(),
            rope_generation: 0,
            cache: 0,
            replays: 0,
        }
    }

    pub(crate) fn set_on(&mut self, on: bool) {
        self.on = on;
        self.recorded.clear();
    }

    pub(crate) fn count(&self) -> usize {
        self.recorded.len()
    }

    pub(crate) fn stats(&self) -> GraphStats {
        GraphStats {
            on: self.on,
            recorded: self.recorded.len(),
            replays: self.replays,
        }
    }
}

/// What the decode graphs of a backend have done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Recording is on (`DSV2_CUDA_GRAPHS` not 0, no `DSV2_PROFILE`, no failed recording).
    pub on: bool,
    /// Graphs held now.
    pub recorded: usize,
    /// Decode steps run by replaying a graph.
    pub replays: u64,
}

/// A step's uploads, by key, as the layer code computes them.
pub(crate) struct Staged {
    pub i32s: Vec<(&'static str, Vec<i32>, Vec<usize>)>,
    pub i64s: Vec<(&'static str, Vec<i64>, Vec<usize>)>,
}

/// What the embedding and every layer's attention upload for `step` (a padded pure decode step),
/// computed by the same functions they use.
pub(crate) fn staged(step: &StepInput, block_size: usize, num_blocks: usize) -> Result<Staged> {
    let n = step.tokens.len();
    let ids: Vec<i32> = step.tokens.iter().map(|&t| t as i32).collect();
    let rows = row_positions(&step.seqs, n, block_size, num_blocks)?;
    let t = decode_tables(&step.seqs, num_blocks)?;
    Ok(Staged {
        i32s: vec![
            (TOKEN_IDS, ids, vec![n]),
            (POSITIONS, rows.pos, vec![n]),
            (BLOCK_TABLE, t.table, vec![n, t.max_blocks]),
            (SEQ_LENS, t.lens, vec![n]),
        ],
        i64s: vec![(CACHE_SLOTS, rows.slots, vec![n])],
    })
}

/// Writes a step's staged values into a recorded graph's input buffers (same keys and shapes:
/// the graph's shape key fixes them).
fn write_inputs<T: dsv2_kernels::DType>(
    gpu: &dsv2_kernels::Gpu,
    bufs: &mut GraphInputs<T>,
    staged: &[(&'static str, Vec<T>, Vec<usize>)],
) -> Result<()> {
    for (key, host, _) in staged {
        let t = bufs
            .get_mut(key)
            .ok_or_else(|| err(format!("recorded graph has no input {key}")))?;
        Arc::get_mut(t)
            .ok_or_else(|| err(format!("graph input {key} is shared")))?
            .write_host(gpu, host)
            .kx()?;
    }
    Ok(())
}

impl CudaBackend {
    /// [`dsv2_core::backend::Backend::decode_graph`] on this GPU (see the module comment).
    pub(crate) fn run_decode_graph(
        &self,
        g: &GraphStep<'_>,
        cache: &mut CudaCache,
        layers: &mut DecodeLayers<'_, CudaCache, CudaAct>,
    ) -> Result<Option<CudaAct>> {
        let step = g.step;
        let n = step.tokens.len();
        let mut graphs = self
            .graphs
            .lock()
            .map_err(|_| err("graph table poisoned"))?;
        if !graphs.on
            || n == 0
            || n > MAX_GRAPH_ROWS
            || step.seqs.len() != n
            || !attention::decode_route(g.cfg, g.mode)
        {
            return Ok(None);
        }
        let longest = step.seqs.iter().map(|s| s.blocks.len()).max().unwrap_or(1);
        let shape = Shape {
            cache: cache.id,
            rows: n.next_power_of_two(),
            table_blocks: longest.max(MIN_TABLE_BLOCKS).next_power_of_two(),
        };
        // the RoPE table must cover every position the table can hold, and the graphs must read
        // the current one
        let generation = self.ensure_rope(g.rope, shape.table_blocks * g.block_size)?;
        // graphs of another cache (a dropped one: ids are never reused) or of an older RoPE
        // table are never replayed again
        if generation != graphs.rope_generation || cache.id != graphs.cache {
            graphs.recorded.clear();
            graphs.rope_generation = generation;
            graphs.cache = cache.id;
        }
        let step = step.padded_decode(shape.rows, shape.table_blocks);
        if g.block_size != cache.block_size {
            return Ok(None); // the layers report it
        }
        // checks every block id against the cache: a replay writes where the table says
        let inputs = staged(&step, g.block_size, cache.num_blocks())?;
        if let Some(rec) = graphs.recorded.get_mut(&shape) {
            let _g = self.lock()?;
            write_inputs(&self.gpu, &mut rec.inputs_i32, &inputs.i32s)?;
            write_inputs(&self.gpu, &mut rec.inputs_i64, &inputs.i64s)?;
            rec.graph.launch().kx()?;
            let hidden = rec.hidden.clone_on_device(&self.gpu).kx()?;
            graphs.replays += 1;
            return Ok(Some(CudaAct::Bf16(hidden)));
        }
        // first step of this shape: eagerly, then record
        let hidden = layers(&step, cache)?;
        match self.record(&step, &inputs, &hidden, cache, layers) {
            Ok(rec) => {
                graphs.recorded.insert(shape, rec);
                tracing::info!(
                    rows = shape.rows,
                    table_blocks = shape.table_blocks,
                    graphs = graphs.count(),
                    "recorded a CUDA graph for decode steps of this shape"
                );
            }
            Err(e) => {
                graphs.on = false;
                graphs.recorded.clear();
                tracing::warn!(
                    "CUDA graphs are off for this process ({ENV}=0 hides this): recording a \
                     decode step failed: {e}"
                );
            }
        }
        Ok(Some(hidden))
    }

    /// Records `layers(step)` into a graph that reads its inputs from fixed buffers made from
    /// `inputs` and copies the hidden states into a fixed buffer shaped like `like`.
    fn record(
        &self,
        step: &StepInput,
        inputs: &Staged,
        like: &CudaAct,
        cache: &mut CudaCache,
        layers: &mut DecodeLayers<'_, CudaCache, CudaAct>,
    ) -> Result<Recorded> {
        let CudaAct::Bf16(like) = like else {
            return Err(err("decode hidden states are not bf16"));
        };
        let (inputs_i32, inputs_i64, mut hidden) = {
            let _g = self.lock()?;
            let mut i32s = HashMap::new();
            for (key, host, shape) in &inputs.i32s {
                i32s.insert(
                    *key,
                    Arc::new(Tensor::from_host(&self.gpu, host, shape).kx()?),
                );
            }
            let mut i64s = HashMap::new();
            for (key, host, shape) in &inputs.i64s {
                i64s.insert(
                    *key,
                    Arc::new(Tensor::from_host(&self.gpu, host, shape).kx()?),
                );
            }
            let hidden = Tensor::<bf16>::uninit(&self.gpu, like.shape()).kx()?;
            (i32s, i64s, hidden)
        };
        self.stage_uploads(Some((inputs, &inputs_i32, &inputs_i64)))?;
        {
            let _g = self.lock()?;
            self.gpu
                .stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                .kx()?;
        }
        // whatever happens inside, the recording must be ended and the staging cleared
        let body = layers(step, cache).and_then(|h| match h {
            CudaAct::Bf16(t) if t.shape() == hidden.shape() => {
                let _g = self.lock()?;
                self.gpu
                    .stream
                    .memcpy_dtod(t.buf(), hidden.buf_mut())
                    .kx()?;
                drop(t); // freed inside the graph: the graph owns no memory past its end
                Ok(())
            }
            _ => Err(err(
                "recorded decode step returned hidden states of another shape",
            )),
        });
        let graph = {
            let _g = self.lock()?;
            self.gpu.stream.end_capture(CUgraphInstantiate_flags(0))
        };
        self.stage_uploads(None)?;
        body?;
        let graph = graph
            .kx()?
            .ok_or_else(|| err("stream capture produced no graph"))?;
        graph.upload().kx()?;
        Ok(Recorded {
            graph,
            inputs_i32,
            inputs_i64,
            hidden,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsv2_core::backend::SeqChunk;

    fn chunk(row: usize, pos0: usize, blocks: Vec<u32>) -> SeqChunk {
        SeqChunk {
            rows: row..row + 1,
            pos0,
            blocks,
        }
    }

    #[test]
    fn padding_repeats_the_first_sequence_and_widens_block_lists() {
        let step = StepInput {
            tokens: vec![7, 8, 9],
            seqs: vec![
                chunk(0, 20, vec![3, 4]),
                chunk(1, 5, vec![9]),
                chunk(2, 0, vec![1]),
            ],
        };
        let p = step.padded_decode(4, 32);
        assert_eq!(p.tokens, vec![7, 8, 9, 7]);
        assert_eq!(p.seqs.len(), 4);
        assert_eq!(p.seqs[3].rows, 3..4);
        assert_eq!(p.seqs[3].pos0, 20);
        assert_eq!(&p.seqs[3].blocks[..2], &[3, 4]);
        assert!(p.seqs.iter().all(|s| s.blocks.len() == 32));
        assert!(p.seqs[1].blocks[1..].iter().all(|&b| b == 0));
        let st = staged(&p, 16, 10).expect("staged");
        let get = |k: &str| {
            st.i32s
                .iter()
                .find(|(key, _, _)| *key == k)
                .map(|(_, v, s)| (v.clone(), s.clone()))
                .expect("key")
        };
        assert_eq!(get(TOKEN_IDS).0, vec![7, 8, 9, 7]);
        assert_eq!(get(POSITIONS).0, vec![20, 5, 0, 20]);
        assert_eq!(get(SEQ_LENS).0, vec![21, 6, 1, 21]);
        assert_eq!(get(BLOCK_TABLE).1, vec![4, 32]);
        // the padding row writes the first sequence's slot again: same token, same value
        assert_eq!(st.i64s[0].1, vec![4 * 16 + 4, 9 * 16 + 5, 16, 4 * 16 + 4]);
    }

    #[test]
    fn a_block_beyond_the_cache_is_an_error_not_a_stray_write() {
        let step = StepInput {
            tokens: vec![1],
            seqs: vec![chunk(0, 0, vec![99])],
        };
        assert!(staged(&step.padded_decode(1, 32), 16, 10).is_err());
    }
}
