//! The DeepSeek-V2 decoder, generic over the backend: weight loading by checkpoint name and the
//! forward pass of one scheduler step (any mix of prefill chunks and decode tokens).

use std::sync::Arc;

use crate::backend::{
    AttnBatch, AttnMode, AttnWeights, Backend, ExpertBank, GraphStep, MlpWeights, QProj, SeqChunk,
};
use crate::config::ModelConfig;
use crate::error::{CoreError, ExpertRows, Result};
use crate::kv_cache::KvCache;
use crate::rope::RopeTable;
use crate::routing::{Routing, RoutingParams};
use crate::weights::{WeightStore, routed_expert_of};

enum Ffn<W> {
    Dense(MlpWeights<W>),
    Moe {
        gate: W,
        shared: Option<MlpWeights<W>>,
    },
}

struct Layer<W> {
    input_norm: W,
    post_norm: W,
    attn: AttnWeights<W>,
    ffn: Ffn<W>,
}

/// Everything but the routed experts: what the router (attention service) holds.
pub struct Model<B: Backend> {
    pub cfg: ModelConfig,
    pub backend: Arc<B>,
    pub rope: RopeTable,
    routing: RoutingParams,
    embed: B::Weight,
    layers: Vec<Layer<B::Weight>>,
    norm: B::Weight,
    /// `None` when the embeddings are tied.
    lm_head: Option<B::Weight>,
}

/// One scheduler step: the new tokens of every sequence, concatenated.
#[derive(Debug, Clone, Default)]
pub struct StepInput {
    pub tokens: Vec<u32>,
    pub seqs: Vec<SeqChunk>,
}

impl StepInput {
    /// A pure decode step (row i = sequence i, one token each) padded to `rows` rows with copies
    /// of its first sequence, and every block list padded with block 0 to at least `min_blocks`
    /// entries: a fixed shape that a recorded graph can replay (see `Backend::decode_graph`).
    /// A copy recomputes the first sequence's token at the same position and writes the same
    /// values into the same cache slot, so it changes nothing; its rows follow the real ones.
    pub fn padded_decode(&self, rows: usize, min_blocks: usize) -> StepInput {
        let pad = |s: &SeqChunk, row: usize| {
            let mut blocks = s.blocks.clone();
            if blocks.len() < min_blocks {
                blocks.resize(min_blocks, 0);
            }
            SeqChunk {
                rows: row..row + 1,
                pos0: s.pos0,
                blocks,
            }
        };
        let mut out = StepInput {
            tokens: self.tokens.clone(),
            seqs: self
                .seqs
                .iter()
                .enumerate()
                .map(|(i, s)| pad(s, i))
                .collect(),
        };
        if let (Some(&t0), Some(s0)) = (self.tokens.first(), self.seqs.first()) {
            for row in self.tokens.len()..rows {
                out.tokens.push(t0);
                out.seqs.push(pad(s0, row));
            }
        }
        out
    }
}

/// Routed experts' results for one MoE layer, possibly still being computed elsewhere (remote
/// shards); the model computes the shared experts before it waits.
pub enum PendingExperts<B: Backend> {
    Ready(B::Act),
    Later(Box<dyn FnOnce() -> Result<B::Act> + Send>),
}

impl<B: Backend> PendingExperts<B> {
    pub fn wait(self) -> Result<B::Act> {
        match self {
            PendingExperts::Ready(a) => Ok(a),
            PendingExperts::Later(f) => f(),
        }
    }
}

/// Runs the routed experts of a MoE layer: in-process, or on expert shards.
///
/// Failures: when the experts some rows chose cannot be reached (no live shard hosts them), the
/// dispatch or its wait fails with [`CoreError::Experts`] naming those rows
/// ([`ExpertRows::Only`], rows of `x`, which are the rows of the step): the engine then fails
/// just the sequences of those rows and runs the step again without them. A failure that is
/// not tied to rows (a lost NCCL data plane) is [`ExpertRows::All`].
pub trait ExpertExecutor<B: Backend>: Send + Sync {
    fn dispatch(&self, layer: usize, x: &B::Act, routing: &Routing) -> Result<PendingExperts<B>>;

    /// Layer `layer`'s expert bank when this executor runs it in-process on the model's own
    /// backend (so the backend may route and run it in one call, see
    /// [`Backend::route_local_experts`]); None for shards and wrappers.
    fn local_bank(&self, _layer: usize) -> Option<&ExpertBank<B::Weight>> {
        None
    }

    /// Routes `x` with `gate` and dispatches it in one step, for an executor that ships the
    /// routing where the backend computed it (the NCCL decode slots keep it on the GPU instead
    /// of a host round trip per layer). None: the model routes on the host and calls
    /// [`ExpertExecutor::dispatch`].
    fn dispatch_gated(
        &self,
        _layer: usize,
        _gate: &B::Weight,
        _x: &B::Act,
        _p: &RoutingParams,
    ) -> Result<Option<PendingExperts<B>>> {
        Ok(None)
    }
}

/// Which routed experts a process loads.
#[derive(Debug, Clone)]
pub enum ExpertSelection {
    All,
    Only(Vec<usize>),
}

impl ExpertSelection {
    pub fn contains(&self, e: usize) -> bool {
        match self {
            ExpertSelection::All => true,
            ExpertSelection::Only(v) => v.contains(&e),
        }
    }
}

/// Logs load progress by layer, at most every few seconds: a full-size model takes minutes to
/// load and a service should say how far it got (a tiny model logs nothing).
struct LoadProgress {
    what: &'static str,
    layers: usize,
    start: std::time::Instant,
    last: std::time::Instant,
}

impl LoadProgress {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(3);

    fn new(what: &'static str, layers: usize) -> Self {
        let now = std::time::Instant::now();
        LoadProgress {
            what,
            layers,
            start: now,
            last: now,
        }
    }

    fn layer(&mut self, l: usize) {
        if self.last.elapsed() >= Self::EVERY {
            self.last = std::time::Instant::now();
            tracing::info!(
                part = self.what,
                layer = l,
                of = self.layers,
                secs = self.start.elapsed().as_secs_f64(),
                "loading"
            );
        }
    }
}

/// Routed experts held in this process, per layer (None for dense layers).
pub struct LocalExperts<B: Backend> {
    backend: Arc<B>,
    banks: Vec<Option<ExpertBank<B::Weight>>>,
    hosted: Vec<usize>,
}

impl<B: Backend> LocalExperts<B> {
    /// Tensor-name filter for the checkpoint: only the selected experts.
    pub fn wants(selection: &ExpertSelection) -> impl Fn(&str) -> bool + '_ {
        move |name| routed_expert_of(name).is_some_and(|(_, e)| selection.contains(e))
    }

    pub fn load(
        backend: Arc<B>,
        cfg: &ModelConfig,
        store: &WeightStore,
        selection: &ExpertSelection,
    ) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
        let hosted: Vec<usize> = (0..cfg.n_routed_experts)
            .filter(|&e| selection.contains(e))
            .collect();
        if let ExpertSelection::Only(v) = selection
            && let Some(bad) = v.iter().find(|&&e| e >= cfg.n_routed_experts)
        {
            return Err(CoreError::InvalidInput(format!(
                "expert {bad} does not exist: the model has {} routed experts (0..{})",
                cfg.n_routed_experts,
                cfg.n_routed_experts.saturating_sub(1)
            )));
        }
        let mut banks = Vec::with_capacity(cfg.num_hidden_layers);
        let mut progress = LoadProgress::new("routed experts", cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            progress.layer(l);
            if !cfg.is_moe_layer(l) {
                banks.push(None);
                continue;
            }
            let mut experts = Vec::with_capacity(cfg.n_routed_experts);
            for e in 0..cfg.n_routed_experts {
                if !selection.contains(e) {
                    experts.push(None);
                    continue;
                }
                let p = format!("model.layers.{l}.mlp.experts.{e}");
                experts.push(Some(MlpWeights {
                    gate: backend.weight(store.get(&format!("{p}.gate_proj.weight"), &[i, h])?)?,
                    up: backend.weight(store.get(&format!("{p}.up_proj.weight"), &[i, h])?)?,
                    down: backend.weight(store.get(&format!("{p}.down_proj.weight"), &[h, i])?)?,
                }));
            }
            banks.push(Some(ExpertBank { experts }));
        }
        Ok(LocalExperts {
            backend,
            banks,
            hosted,
        })
    }

    pub fn hosted(&self) -> &[usize] {
        &self.hosted
    }

    /// Runs this process's share of layer `layer` synchronously.
    pub fn forward(&self, layer: usize, x: &B::Act, routing: &Routing) -> Result<B::Act> {
        let bank = self
            .banks
            .get(layer)
            .and_then(|b| b.as_ref())
            .ok_or_else(|| CoreError::InvalidInput(format!("layer {layer} is not a MoE layer")))?;
        self.backend.experts(bank, x, routing)
    }
}

impl<B: Backend> ExpertExecutor<B> for LocalExperts<B> {
    fn dispatch(&self, layer: usize, x: &B::Act, routing: &Routing) -> Result<PendingExperts<B>> {
        Ok(PendingExperts::Ready(self.forward(layer, x, routing)?))
    }

    fn local_bank(&self, layer: usize) -> Option<&ExpertBank<B::Weight>> {
        self.banks.get(layer).and_then(|b| b.as_ref())
    }
}

impl<B: Backend> Model<B> {
    /// Tensor-name filter for the checkpoint: everything but routed experts.
    pub fn wants(name: &str) -> bool {
        routed_expert_of(name).is_none()
    }

    pub fn load(backend: Arc<B>, cfg: ModelConfig, store: &WeightStore) -> Result<Self> {
        let c = &cfg;
        let (h, v, heads) = (c.hidden_size, c.vocab_size, c.num_attention_heads);
        let w = |name: &str, shape: &[usize]| -> Result<B::Weight> {
            backend.weight(store.get(name, shape)?)
        };
        let embed = w("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        let mut progress = LoadProgress::new("attention side", c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            progress.layer(l);
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let q = match c.q_lora_rank {
                Some(r) => QProj::LowRank {
                    a: w(&format!("{a}.q_a_proj.weight"), &[r, h])?,
                    norm: w(&format!("{a}.q_a_layernorm.weight"), &[r])?,
                    b: w(
                        &format!("{a}.q_b_proj.weight"),
                        &[heads * c.q_head_dim(), r],
                    )?,
                },
                None => QProj::Plain(w(
                    &format!("{a}.q_proj.weight"),
                    &[heads * c.q_head_dim(), h],
                )?),
            };
            let attn = AttnWeights {
                q,
                kv_a: w(
                    &format!("{a}.kv_a_proj_with_mqa.weight"),
                    &[c.latent_cache_width(), h],
                )?,
                kv_a_norm: w(&format!("{a}.kv_a_layernorm.weight"), &[c.kv_lora_rank])?,
                kv_b: w(
                    &format!("{a}.kv_b_proj.weight"),
                    &[heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank],
                )?,
                o: w(&format!("{a}.o_proj.weight"), &[h, heads * c.v_head_dim])?,
            };
            let mlp = |prefix: &str, inter: usize| -> Result<MlpWeights<B::Weight>> {
                Ok(MlpWeights {
                    gate: w(&format!("{prefix}.gate_proj.weight"), &[inter, h])?,
                    up: w(&format!("{prefix}.up_proj.weight"), &[inter, h])?,
                    down: w(&format!("{prefix}.down_proj.weight"), &[h, inter])?,
                })
            };
            let ffn = if c.is_moe_layer(l) {
                Ffn::Moe {
                    gate: w(&format!("{p}.mlp.gate.weight"), &[c.n_routed_experts, h])?,
                    shared: if c.n_shared_experts > 0 {
                        Some(mlp(
                            &format!("{p}.mlp.shared_experts"),
                            c.shared_intermediate_size(),
                        )?)
                    } else {
                        None
                    },
                }
            } else {
                Ffn::Dense(mlp(&format!("{p}.mlp"), c.intermediate_size)?)
            };
            layers.push(Layer {
                input_norm: w(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: w(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                attn,
                ffn,
            });
        }
        let norm = w("model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(w("lm_head.weight", &[v, h])?)
        };
        Ok(Model {
            rope: RopeTable::new(c),
            routing: RoutingParams::from_config(c),
            cfg,
            backend,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    pub fn new_cache(&self, num_blocks: usize, block_size: usize) -> Result<KvCache<B>> {
        KvCache::new(&*self.backend, &self.cfg, num_blocks, block_size)
    }

    /// Runs one step and returns the logits of `logit_rows` (rows of `step.tokens`), as
    /// [logit_rows.len(), vocab] f32 on the host.
    pub fn forward(
        &self,
        step: &StepInput,
        cache: &mut KvCache<B>,
        experts: &dyn ExpertExecutor<B>,
        mode: AttnMode,
        logit_rows: &[usize],
    ) -> Result<Vec<f32>> {
        let logits = self.forward_logits(step, cache, experts, mode, logit_rows)?;
        self.backend.act_to_host(&logits)
    }

    /// Like `forward`, with the logits left where the backend computed them.
    pub fn forward_logits(
        &self,
        step: &StepInput,
        cache: &mut KvCache<B>,
        experts: &dyn ExpertExecutor<B>,
        mode: AttnMode,
        logit_rows: &[usize],
    ) -> Result<B::Act> {
        let n = step.tokens.len();
        if let Some(bad) = step
            .tokens
            .iter()
            .find(|&&t| t as usize >= self.cfg.vocab_size)
        {
            return Err(CoreError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.cfg.vocab_size
            )));
        }
        for s in &step.seqs {
            if s.rows.end > n || cache.blocks_for(s.pos0 + s.rows.len()) > s.blocks.len() {
                return Err(CoreError::Cache(format!(
                    "sequence chunk rows {:?} at position {} is not covered by its {} blocks",
                    s.rows,
                    s.pos0,
                    s.blocks.len()
                )));
            }
        }
        if let Some(&bad) = logit_rows.iter().find(|&&r| r >= n) {
            return Err(CoreError::InvalidInput(format!(
                "logit row {bad} is outside the step's {n} rows"
            )));
        }
        let b = &*self.backend;
        let block_size = cache.block_size();
        let graphed = if self.graph_eligible(step, experts) {
            let g = GraphStep {
                step,
                cfg: &self.cfg,
                rope: &self.rope,
                block_size,
                mode,
            };
            b.decode_graph(
                &g,
                &mut cache.storage,
                &mut |s: &StepInput, storage: &mut B::Cache| {
                    self.forward_layers(s, storage, block_size, experts, mode)
                },
            )
            .map_err(|e| unpad_expert_rows(e, n))?
        } else {
            None
        };
        let hidden = match graphed {
            Some(h) => h,
            None => self.forward_layers(step, &mut cache.storage, block_size, experts, mode)?,
        };
        // the final norm is per row: normalising only the logit rows is the same
        let last = b.select_rows(&hidden, logit_rows)?;
        let normed = b.rms_norm(&last, &self.norm, self.cfg.rms_norm_eps)?;
        b.linear(&normed, self.lm_head.as_ref().unwrap_or(&self.embed))
    }

    /// A pure decode step (one new token per sequence, row i = sequence i) whose routed experts
    /// are all in this process: what a backend may run as a recorded graph.
    fn graph_eligible(&self, step: &StepInput, experts: &dyn ExpertExecutor<B>) -> bool {
        let n = step.tokens.len();
        n > 0
            && step.seqs.len() == n
            && step
                .seqs
                .iter()
                .enumerate()
                .all(|(i, s)| s.rows == (i..i + 1))
            && (0..self.cfg.num_hidden_layers)
                .all(|l| !self.cfg.is_moe_layer(l) || experts.local_bank(l).is_some())
    }

    /// Embedding and every layer of one step: the hidden states [rows, hidden], before the
    /// final norm.
    fn forward_layers(
        &self,
        step: &StepInput,
        storage: &mut B::Cache,
        block_size: usize,
        experts: &dyn ExpertExecutor<B>,
        mode: AttnMode,
    ) -> Result<B::Act> {
        let b = &*self.backend;
        let eps = self.cfg.rms_norm_eps;
        let batch = AttnBatch {
            seqs: &step.seqs,
            rope: &self.rope,
            block_size,
            mode,
        };
        let mut hidden = b.embed(&self.embed, &step.tokens)?;
        // each sublayer's output joins the residual stream in the next norm's pass
        let mut ffn_out: Option<B::Act> = None;
        for (l, layer) in self.layers.iter().enumerate() {
            // the backend may run the add + norm inside attention's first launch
            let attn = match ffn_out.take() {
                Some(out) => b.attention_after_add_norm(
                    &self.cfg,
                    &layer.attn,
                    &mut hidden,
                    &out,
                    &layer.input_norm,
                    eps,
                    &batch,
                    storage,
                    l,
                )?,
                None => {
                    let x = b.rms_norm(&hidden, &layer.input_norm, eps)?;
                    b.attention(&self.cfg, &layer.attn, &x, &batch, storage, l)?
                }
            };
            // with this layer's experts held here, the backend may run the norm in the gate's
            // launch (add_rms_norm_route_local_experts); `local` is then their output
            let local_bank = match &layer.ffn {
                Ffn::Moe { .. } => experts.local_bank(l),
                Ffn::Dense(_) => None,
            };
            let (x, mut local) = match (&layer.ffn, local_bank) {
                (Ffn::Moe { gate, shared }, Some(bank)) => b.add_rms_norm_route_local_experts(
                    &mut hidden,
                    &attn,
                    &layer.post_norm,
                    eps,
                    gate,
                    shared.as_ref(),
                    &self.routing,
                    bank,
                )?,
                _ => (
                    b.add_rms_norm(&mut hidden, &attn, &layer.post_norm, eps)?,
                    None,
                ),
            };
            let out = match &layer.ffn {
                Ffn::Dense(mlp) => b.mlp(mlp, &x)?,
                Ffn::Moe { gate, shared } => {
                    let (mut routed, shared_out) = match local.take() {
                        // the shared experts are in already
                        Some(r) => (r, None),
                        None => {
                            let pending =
                                match experts.dispatch_gated(l, gate, &x, &self.routing)? {
                                    Some(p) => p,
                                    None => {
                                        let routing = b.route(gate, &x, &self.routing)?;
                                        experts.dispatch(l, &x, &routing)?
                                    }
                                };
                            // Shared experts run while routed experts are away.
                            let shared_out = shared.as_ref().map(|s| b.mlp(s, &x)).transpose()?;
                            (pending.wait()?, shared_out)
                        }
                    };
                    if let Some(s) = shared_out {
                        b.add_assign(&mut routed, &s)?;
                    }
                    routed
                }
            };
            ffn_out = Some(out);
        }
        if let Some(out) = ffn_out {
            b.add_assign(&mut hidden, &out)?;
        }
        Ok(hidden)
    }
}

/// The rows an expert failure names are rows of the step the engine built: a padded decode
/// step's extra rows are copies of its first row ([`StepInput::padded_decode`]), so their
/// failure is the first sequence's.
fn unpad_expert_rows(e: CoreError, n: usize) -> CoreError {
    match e {
        CoreError::Experts {
            msg,
            rows: ExpertRows::Only(rows),
        } => CoreError::experts_for_rows(
            rows.into_iter()
                .map(|r| if r < n { r } else { 0 })
                .collect(),
            msg,
        ),
        e => e,
    }
}

/// Loads the attention-side model and all routed experts of `dir` into one process (the
/// single-process mode of `dsv2 generate/logits`, and the reference for distributed runs).
pub fn load_local<B: Backend>(
    backend: Arc<B>,
    dir: &std::path::Path,
) -> Result<(Model<B>, LocalExperts<B>)> {
    load_local_with(backend, dir, None)
}

/// [`load_local`], or with `random = Some(seed)` the random weights of `dir/config.json`
/// ([`WeightStore::random`]).
pub fn load_local_with<B: Backend>(
    backend: Arc<B>,
    dir: &std::path::Path,
    random: Option<u64>,
) -> Result<(Model<B>, LocalExperts<B>)> {
    let cfg = ModelConfig::from_model_dir(dir)?;
    let store = WeightStore::open_or_random(dir, random, |_| true)?;
    let model = Model::load(backend.clone(), cfg.clone(), &store)?;
    let experts = LocalExperts::load(backend, &cfg, &store, &ExpertSelection::All)?;
    Ok((model, experts))
}

/// Logits at every position of `tokens` ([len, vocab]): one prefill over all tokens, or with
/// `decode_from = Some(k)` a prefill of the first k tokens and then one token at a time through
/// the latent cache.
pub fn position_logits<B: Backend>(
    model: &Model<B>,
    experts: &dyn ExpertExecutor<B>,
    tokens: &[u32],
    decode_from: Option<usize>,
    mode: AttnMode,
) -> Result<Vec<f32>> {
    if tokens.is_empty() {
        return Err(CoreError::InvalidInput("no tokens to score".into()));
    }
    let block_size = 16;
    let mut cache = model.new_cache(tokens.len().div_ceil(block_size), block_size)?;
    let mut table = crate::kv_cache::BlockTable::default();
    cache.reserve(&mut table, tokens.len())?;
    let first = decode_from.unwrap_or(tokens.len()).min(tokens.len());
    if decode_from == Some(0) {
        return Err(CoreError::InvalidInput(
            "--decode-from must be at least 1 (the prefill needs a token)".into(),
        ));
    }
    let mut out = Vec::with_capacity(tokens.len() * model.cfg.vocab_size);
    let mut chunks = vec![(0usize, first)];
    chunks.extend((first..tokens.len()).map(|p| (p, p + 1)));
    for (start, end) in chunks {
        let step = StepInput {
            tokens: tokens[start..end].to_vec(),
            seqs: vec![SeqChunk {
                rows: 0..end - start,
                pos0: start,
                blocks: table.blocks.clone(),
            }],
        };
        let rows: Vec<usize> = (0..end - start).collect();
        out.extend(model.forward(&step, &mut cache, experts, mode, &rows)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_padded_rows_expert_failure_is_the_first_sequences() {
        let e = unpad_expert_rows(CoreError::experts_for_rows(vec![5, 2, 3], "gone"), 3);
        assert!(matches!(
            e,
            CoreError::Experts { rows: ExpertRows::Only(ref r), .. } if r == &[0, 2]
        ));
        let e = unpad_expert_rows(CoreError::experts("gone"), 3);
        assert!(matches!(
            e,
            CoreError::Experts {
                rows: ExpertRows::All,
                ..
            }
        ));
    }
}
