//! What a step must move and compute, from the config alone: the numerators of the roofline.
//!
//! Decode step of B sequences, sequence i attending over ctx_i cached tokens (its new one
//! included), MoE layer l touching E_l distinct routed experts:
//!   bytes = dense weights, each read once (attention, norms, gate, shared experts, dense MLPs,
//!           final norm and the whole lm_head; of the embedding table only the B rows looked up)
//!         + Σ_l E_l × (gate + up + down of one routed expert)
//!         + KV read: Σ_i ctx_i × cache bytes per token × layers (MLA: 576 values per token per
//!           layer, 1,152 bytes in bf16, 656 in the FP8 cache's layout; the new token's write
//!           is within ctx_i)
//!   FLOPs = 2 × active parameters × B (attention matrices incl. kv_b, whose W_UK/W_UV blocks are
//!           the absorbed query and output products; gate; shared experts; top-k routed experts;
//!           dense MLPs; lm_head for the B logit rows)
//!         + attention over the latent cache: 2 × heads × Σ_i ctx_i × (2 × kv_lora_rank +
//!           qk_rope_head_dim) per layer (scores over 512 + 64, values over 512)
//!   roofline = max(bytes ÷ copy bandwidth, FLOPs ÷ GEMM rate).
//! Prefill of prompts of L_i tokens (K/V decompressed, causal attention):
//!   FLOPs = 2 × active parameters × Σ_i L_i (lm_head only for the B last rows)
//!         + 2 × heads × (qk_nope + qk_rope + v_head) × Σ_i L_i (L_i + 1) / 2 per layer
//!   floor = FLOPs ÷ GEMM rate.
//! Activations, routing tables and logits are left out: small next to weights and cache.

use dsv2_core::ModelConfig;
use dsv2_core::layout::{LINEAR_STD, expected_tensors};
use dsv2_core::weights::routed_expert_of;

/// Parameter and byte counts of a model as a backend holds it.
#[derive(Debug, Clone)]
pub struct ModelCost {
    pub layers: usize,
    pub moe_layers: usize,
    pub heads: usize,
    pub kv_lora_rank: usize,
    pub cache_width: usize,
    pub qk_head_dim: usize,
    pub v_head_dim: usize,
    /// Bytes of one cached token of one layer, as the backend holds it.
    pub cache_token_bytes: usize,
    /// Bytes of every tensor but the routed experts and the embedding table (read once a step).
    pub dense_bytes: f64,
    /// Bytes of one embedding row.
    pub embed_row_bytes: f64,
    /// Bytes of one routed expert (gate + up + down).
    pub expert_bytes: f64,
    /// Multiply-adds of one token through every layer (attention matrices, gate, shared and
    /// top-k routed experts, dense MLPs), lm_head excluded.
    pub body_macs_per_token: f64,
    /// Multiply-adds of one logit row (lm_head).
    pub head_macs_per_row: f64,
}

/// One step's numerators.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepCost {
    pub weight_bytes: f64,
    pub expert_bytes: f64,
    pub kv_bytes: f64,
    pub linear_flops: f64,
    pub attention_flops: f64,
}

impl StepCost {
    pub fn bytes(&self) -> f64 {
        self.weight_bytes + self.expert_bytes + self.kv_bytes
    }
    pub fn flops(&self) -> f64 {
        self.linear_flops + self.attention_flops
    }
}

impl ModelCost {
    /// `elem_bytes(name)`: bytes of one element of tensor `name` where the backend holds it;
    /// `cache_token_bytes`: bytes of one cached token of one layer there.
    pub fn new(
        cfg: &ModelConfig,
        elem_bytes: impl Fn(&str) -> usize,
        cache_token_bytes: usize,
    ) -> Self {
        let (mut dense_bytes, mut expert_bytes, mut embed_row_bytes) = (0f64, 0f64, 0f64);
        let mut head_macs = 0f64;
        let mut matrix_macs = 0f64; // every 2-D weight but experts, embedding, lm_head
        for t in expected_tensors(cfg, LINEAR_STD) {
            let numel: usize = t.shape.iter().product();
            let bytes = (numel * elem_bytes(&t.name)) as f64;
            if let Some((layer, expert)) = routed_expert_of(&t.name) {
                // every routed expert has the same shape: count the first MoE layer's expert 0
                if expert == 0 && Some(layer) == cfg.moe_layers().first().copied() {
                    expert_bytes += bytes;
                }
                continue;
            }
            if t.name == "model.embed_tokens.weight" {
                embed_row_bytes = bytes / cfg.vocab_size.max(1) as f64;
                if cfg.tie_word_embeddings {
                    dense_bytes += bytes; // read whole as the lm_head
                    head_macs = numel as f64;
                }
                continue;
            }
            dense_bytes += bytes;
            if t.name == "lm_head.weight" {
                head_macs = numel as f64;
            } else if t.shape.len() == 2 {
                matrix_macs += numel as f64;
            }
        }
        let moe_layers = cfg.moe_layers().len();
        let routed_macs = (moe_layers
            * cfg.num_experts_per_tok
            * 3
            * cfg.hidden_size
            * cfg.moe_intermediate_size) as f64;
        ModelCost {
            layers: cfg.num_hidden_layers,
            moe_layers,
            heads: cfg.num_attention_heads,
            kv_lora_rank: cfg.kv_lora_rank,
            cache_width: cfg.latent_cache_width(),
            qk_head_dim: cfg.q_head_dim(),
            v_head_dim: cfg.v_head_dim,
            cache_token_bytes,
            dense_bytes,
            embed_row_bytes,
            expert_bytes,
            body_macs_per_token: matrix_macs + routed_macs,
            head_macs_per_row: head_macs,
        }
    }

    /// A decode step: one row per sequence, sequence i attending over `ctx[i]` tokens, and
    /// `experts_touched` distinct routed experts per MoE layer (mean over layers).
    pub fn decode(&self, ctx: &[usize], experts_touched: f64) -> StepCost {
        let rows = ctx.len() as f64;
        let kv_tokens: f64 = ctx.iter().map(|&c| c as f64).sum();
        let layers = self.layers as f64;
        StepCost {
            weight_bytes: self.dense_bytes + rows * self.embed_row_bytes,
            expert_bytes: self.moe_layers as f64 * experts_touched * self.expert_bytes,
            kv_bytes: kv_tokens * self.cache_token_bytes as f64 * layers,
            linear_flops: 2.0 * rows * (self.body_macs_per_token + self.head_macs_per_row),
            attention_flops: 2.0
                * self.heads as f64
                * kv_tokens
                * (self.kv_lora_rank + self.cache_width) as f64
                * layers,
        }
    }

    /// The prefill of prompts of `lens[i]` tokens, one logit row each (bytes are not counted:
    /// its floor is compute).
    pub fn prefill(&self, lens: &[usize]) -> StepCost {
        let tokens: f64 = lens.iter().map(|&l| l as f64).sum();
        let pairs: f64 = lens
            .iter()
            .map(|&l| (l as f64) * (l as f64 + 1.0) / 2.0)
            .sum();
        StepCost {
            linear_flops: 2.0
                * (tokens * self.body_macs_per_token + lens.len() as f64 * self.head_macs_per_row),
            attention_flops: 2.0
                * self.heads as f64
                * pairs
                * (self.qk_head_dim + self.v_head_dim) as f64
                * self.layers as f64,
            ..Default::default()
        }
    }
}

/// The roofline time of a step and what binds it.
pub fn roofline_s(
    c: &StepCost,
    copy_bytes_per_s: f64,
    gemm_flops_per_s: f64,
) -> (f64, &'static str) {
    let mem = c.bytes() / copy_bytes_per_s;
    let compute = c.flops() / gemm_flops_per_s;
    if mem >= compute {
        (mem, "memory")
    } else {
        (compute, "compute")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig::from_json_str(&dsv2_core::tiny::config_json().to_string()).unwrap()
    }

    #[test]
    fn tiny_counts_by_hand() {
        let cfg = tiny();
        let c = ModelCost::new(&cfg, |_| 2, (64 + 16) * 2);
        // hidden 128, moe_intermediate 64: 3 × 128 × 64 × 2 B
        assert_eq!(c.expert_bytes, (3 * 128 * 64 * 2) as f64);
        assert_eq!(c.embed_row_bytes, 256.0);
        assert_eq!(c.head_macs_per_row, (1024 * 128) as f64);
        assert_eq!(c.moe_layers, 3);
        // batch 1 at 10 tokens of context touching top-6 experts per MoE layer
        let s = c.decode(&[10], 6.0);
        assert_eq!(s.expert_bytes, 3.0 * 6.0 * c.expert_bytes);
        assert_eq!(s.kv_bytes, (10 * (64 + 16) * 2 * 4) as f64);
        assert_eq!(s.attention_flops, (2 * 4 * 10 * (2 * 64 + 16) * 4) as f64);
        // doubling the rows doubles the linear FLOPs and adds one embedding row
        let d = c.decode(&[10, 10], 6.0);
        assert_eq!(d.linear_flops, 2.0 * s.linear_flops);
        assert_eq!(d.weight_bytes - s.weight_bytes, c.embed_row_bytes);
    }

    #[test]
    fn dense_bytes_plus_all_experts_is_the_checkpoint() {
        let cfg = tiny();
        let c = ModelCost::new(&cfg, |_| 2, (64 + 16) * 2);
        let all: usize = expected_tensors(&cfg, LINEAR_STD)
            .iter()
            .map(|t| t.shape.iter().product::<usize>() * 2)
            .sum();
        let embed = (cfg.vocab_size * cfg.hidden_size * 2) as f64;
        let experts = (c.moe_layers * cfg.n_routed_experts) as f64 * c.expert_bytes;
        assert_eq!(c.dense_bytes + embed + experts, all as f64);
    }

    #[test]
    fn prefill_attention_is_causal() {
        let c = ModelCost::new(&tiny(), |_| 2, (64 + 16) * 2);
        let p = c.prefill(&[3]);
        // 3 tokens: 1 + 2 + 3 = 6 (query, key) pairs, heads 4, qk 48 + v 32, 4 layers
        assert_eq!(p.attention_flops, (2 * 4 * 6 * (48 + 32) * 4) as f64);
        assert_eq!(p.bytes(), 0.0);
    }
}
