//! The bench's numbers: per configuration the decode step against its roofline and the prefill
//! against its compute floor, printed as a table and written as JSON with every value.

use std::fmt::Write as _;

use dsv2_core::ModelConfig;
use dsv2_core::backend::Ceilings;
use serde_json::{Value, json};

use super::cost::{ModelCost, StepCost, roofline_s};
use super::measure::Run;
use super::prompts::Prompts;

/// Median of a non-empty slice (the mean of the middle two for an even count); 0 when empty.
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Distinct experts per MoE layer: mean, min, max, how many (layer, step) routings, and where
/// they were seen.
#[derive(Debug, Clone)]
pub struct Touched {
    pub mean: f64,
    pub min: usize,
    pub max: usize,
    pub samples: usize,
    pub source: &'static str,
}

impl Touched {
    fn of(v: &[usize], source: &'static str) -> Self {
        Touched {
            mean: mean(&v.iter().map(|&n| n as f64).collect::<Vec<_>>()),
            min: v.iter().copied().min().unwrap_or(0),
            max: v.iter().copied().max().unwrap_or(0),
            samples: v.len(),
            source,
        }
    }
    fn json(&self) -> Value {
        json!({"mean": self.mean, "min": self.min, "max": self.max, "samples": self.samples,
               "source": self.source})
    }
}

/// Where no routing was seen (the device kept it and --probe-steps is 0): the roofline then
/// counts no routed expert, a lower bound.
const NOT_COUNTED: &str = "not counted (--probe-steps 0): routed experts left out of the bytes";

/// One batch × context, its runs reduced.
pub struct Config {
    pub batch: usize,
    pub context_mean: f64,
    pub prompt_tokens: usize,
    pub distinct_prompts: usize,
    pub decode_steps: usize,
    pub step_s: Vec<f64>,
    pub step_median_s: f64,
    pub tokens_per_s: f64,
    pub tokens_per_s_mean: f64,
    pub touched: Touched,
    pub touched_prefill: Touched,
    /// The middle timed step's cost (steps differ only by one token of context each).
    pub decode_cost: StepCost,
    pub kv_tokens: usize,
    pub memory_s: f64,
    pub compute_s: f64,
    pub roofline_s: f64,
    pub bound: &'static str,
    pub prefill_s: f64,
    pub ttft_first_s: f64,
    pub prefill_steps: usize,
    pub prefill_cost: StepCost,
    pub prefill_floor_s: f64,
    pub output_ids_seq0: Vec<u32>,
}

impl Config {
    pub fn new(
        batch: usize,
        seqs: &[Vec<u32>],
        runs: Vec<Run>,
        cost: &ModelCost,
        c: &Ceilings,
    ) -> Self {
        let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
        let prompt_tokens: usize = lens.iter().sum();
        let step_s: Vec<f64> = runs.iter().flat_map(|r| r.step_s.iter().copied()).collect();
        let all_seen = runs.iter().all(|r| r.steps_fully_seen == r.step_s.len());
        let timed: Vec<usize> = runs.iter().flat_map(|r| r.touched_timed.clone()).collect();
        let probed: Vec<usize> = runs.iter().flat_map(|r| r.touched_probe.clone()).collect();
        let touched = if cost.moe_layers == 0 {
            Touched::of(&[], "no MoE layers")
        } else if timed.is_empty() && probed.is_empty() {
            Touched::of(&[], NOT_COUNTED)
        } else if all_seen {
            Touched::of(&timed, "timed steps")
        } else if timed.is_empty() {
            Touched::of(
                &probed,
                "probe steps (host routing, right after the timed steps)",
            )
        } else {
            let both: Vec<usize> = timed.iter().chain(&probed).copied().collect();
            Touched::of(&both, "timed steps and probe steps")
        };
        let pre: Vec<usize> = runs
            .iter()
            .flat_map(|r| r.touched_prefill.clone())
            .collect();
        let touched_prefill = Touched::of(&pre, "prefill steps");
        // the middle timed step: its context is the median of the steps'
        let ctx = runs
            .first()
            .and_then(|r| r.step_ctx.get(r.step_ctx.len() / 2))
            .cloned()
            .unwrap_or_else(|| lens.clone());
        let decode_cost = cost.decode(&ctx, touched.mean);
        let memory_s = decode_cost.bytes() / c.copy_bytes_per_s;
        let compute_s = decode_cost.flops() / c.gemm_flops_per_s;
        let (roofline, bound) = roofline_s(&decode_cost, c.copy_bytes_per_s, c.gemm_flops_per_s);
        let step_median_s = median(&step_s);
        let prefill_cost = cost.prefill(&lens);
        // the run with the median prefill time
        let mut by_prefill: Vec<&Run> = runs.iter().collect();
        by_prefill.sort_by(|a, b| a.prefill_s.total_cmp(&b.prefill_s));
        let mid = by_prefill.get(by_prefill.len() / 2).copied();
        Config {
            batch,
            context_mean: prompt_tokens as f64 / batch.max(1) as f64,
            prompt_tokens,
            distinct_prompts: Prompts::distinct(seqs),
            decode_steps: step_s.len(),
            tokens_per_s: batch as f64 / step_median_s.max(1e-12),
            tokens_per_s_mean: batch as f64 * step_s.len() as f64
                / step_s.iter().sum::<f64>().max(1e-12),
            step_median_s,
            step_s,
            touched,
            touched_prefill,
            kv_tokens: ctx.iter().sum(),
            decode_cost,
            memory_s,
            compute_s,
            roofline_s: roofline,
            bound,
            prefill_s: mid.map_or(0.0, |r| r.prefill_s),
            ttft_first_s: mid.map_or(0.0, |r| r.ttft_first_s),
            prefill_steps: mid.map_or(0, |r| r.prefill_steps),
            prefill_floor_s: prefill_cost.flops() / c.gemm_flops_per_s,
            prefill_cost,
            output_ids_seq0: runs
                .first()
                .map(|r| r.output_ids_seq0.clone())
                .unwrap_or_default(),
        }
    }

    fn json(&self) -> Value {
        let d = &self.decode_cost;
        let ms = |s: f64| s * 1e3;
        json!({
            "batch": self.batch,
            "context": self.context_mean,
            "prompt_tokens": self.prompt_tokens,
            "distinct_prompts": self.distinct_prompts,
            "decode": {
                "steps": self.decode_steps,
                "step_ms": self.step_s.iter().map(|&s| ms(s)).collect::<Vec<_>>(),
                "step_ms_median": ms(self.step_median_s),
                "step_ms_mean": ms(mean(&self.step_s)),
                "tokens_per_s": self.tokens_per_s,
                "tokens_per_s_mean": self.tokens_per_s_mean,
                "experts_touched_per_moe_layer": self.touched.json(),
                "kv_tokens_read": self.kv_tokens,
                "bytes": {"weights_dense": d.weight_bytes, "weights_experts": d.expert_bytes,
                          "kv_cache": d.kv_bytes, "total": d.bytes()},
                "flops": {"linear": d.linear_flops, "attention": d.attention_flops,
                          "total": d.flops()},
                "memory_time_ms": ms(self.memory_s),
                "compute_time_ms": ms(self.compute_s),
                "roofline_ms": ms(self.roofline_s),
                "bound": self.bound,
                "measured_over_roofline": self.step_median_s / self.roofline_s,
            },
            "prefill": {
                "prompt_tokens": self.prompt_tokens,
                "steps": self.prefill_steps,
                "prefill_ms": ms(self.prefill_s),
                "prompt_tokens_per_s": self.prompt_tokens as f64 / self.prefill_s.max(1e-12),
                "ttft_first_ms": ms(self.ttft_first_s),
                "ttft_last_ms": ms(self.prefill_s),
                "flops": {"linear": self.prefill_cost.linear_flops,
                          "attention": self.prefill_cost.attention_flops,
                          "total": self.prefill_cost.flops()},
                "compute_floor_ms": ms(self.prefill_floor_s),
                "measured_over_floor": self.prefill_s / self.prefill_floor_s,
                "experts_touched_per_moe_layer": self.touched_prefill.json(),
            },
            "output_ids_seq0": self.output_ids_seq0,
        })
    }
}

/// Everything one `dsv2 bench` run prints.
pub struct Report<'a> {
    pub backend: String,
    pub device: String,
    /// `--kv-cache-dtype`.
    pub kv_cache_dtype: String,
    pub threads: usize,
    pub model_dir: String,
    pub random_weights: Option<u64>,
    pub cfg: &'a ModelConfig,
    pub cost: &'a ModelCost,
    pub ceilings: &'a Ceilings,
    pub prompts: &'a Prompts,
    pub new_tokens: usize,
    pub runs: usize,
    pub prefill_tokens: usize,
    pub probe_steps: usize,
    pub block_size: usize,
    pub configs: &'a [Config],
    pub skipped: &'a [Value],
}

/// `v` with an SI prefix: 1.23 G, 456 M, 12.3 k.
pub fn si(v: f64) -> String {
    let (d, p) = match v.abs() {
        x if x >= 1e12 => (1e12, "T"),
        x if x >= 1e9 => (1e9, "G"),
        x if x >= 1e6 => (1e6, "M"),
        x if x >= 1e3 => (1e3, "k"),
        _ => (1.0, ""),
    };
    let x = v / d;
    if x >= 100.0 {
        format!("{x:.0} {p}")
    } else if x >= 10.0 {
        format!("{x:.1} {p}")
    } else {
        format!("{x:.2} {p}")
    }
}

impl Report<'_> {
    pub fn json(&self) -> Value {
        let c = self.ceilings;
        let cfg = self.cfg;
        json!({
            "impl": "dsv2",
            "version": env!("CARGO_PKG_VERSION"),
            "argv": std::env::args().collect::<Vec<_>>(),
            "unix_time_s": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            "backend": self.backend,
            "device": self.device,
            "kv_cache_dtype": self.kv_cache_dtype,
            "threads": self.threads,
            "path": "Model::forward_logits + greedy argmax per step (no engine)",
            "model": {
                "dir": self.model_dir, "random_weights": self.random_weights,
                "layers": cfg.num_hidden_layers, "moe_layers": self.cost.moe_layers,
                "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
                "routed_experts": cfg.n_routed_experts, "top_k": cfg.num_experts_per_tok,
                "shared_experts": cfg.n_shared_experts, "vocab": cfg.vocab_size,
                "dense_weight_bytes": self.cost.dense_bytes,
                "routed_expert_bytes": self.cost.expert_bytes,
                "kv_bytes_per_token": self.cost.cache_token_bytes * self.cost.layers,
            },
            "ceilings": {
                "measured": "in this process, before the runs",
                "copy_bytes_per_s": c.copy_bytes_per_s, "copy_method": c.copy_method,
                "gemm_flops_per_s": c.gemm_flops_per_s, "gemm_method": c.gemm_method,
                "weight_elem_bytes": c.weight_elem_bytes, "cache_elem_bytes": c.cache_elem_bytes,
            },
            "prompts": self.prompts.json(),
            "settings": {
                "new_tokens": self.new_tokens, "decode_steps_per_run": self.new_tokens - 1,
                "runs": self.runs, "prefill_tokens_per_step": self.prefill_tokens,
                "probe_steps": self.probe_steps, "block_size": self.block_size, "sampling": "greedy",
            },
            "formulas": {
                "decode_bytes": "dense weights once (embedding: only the looked-up rows) + sum over MoE layers of experts touched x (gate+up+down of one expert) + KV read: sum over sequences of context x (kv_lora_rank + qk_rope_head_dim) x cache bytes x layers",
                "decode_flops": "2 x active parameters (attention incl. kv_b absorbed, gate, shared, top-k routed, dense MLP, lm_head) x batch + 2 x heads x sum(context) x (2 x kv_lora_rank + qk_rope_head_dim) x layers",
                "roofline": "max(bytes / copy bandwidth, FLOPs / GEMM rate); copy bandwidth counts bytes read + written",
                "prefill_flops": "2 x active parameters x prompt tokens (lm_head: one row per sequence) + 2 x heads x (qk_head_dim + v_head_dim) x sum(L(L+1)/2) x layers",
                "prefill_floor": "FLOPs / GEMM rate",
                "decode_cost_at": "the middle timed step's context; experts touched: mean over MoE layers and steps",
            },
            "results": self.configs.iter().map(Config::json).collect::<Vec<_>>(),
            "skipped": self.skipped,
        })
    }

    pub fn table(&self) -> String {
        let c = self.ceilings;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "dsv2 bench on {}: {} ({} layers, {} MoE, {} routed experts, top-{}); KV cache {}, {} B a token",
            self.backend,
            self.model_dir,
            self.cfg.num_hidden_layers,
            self.cost.moe_layers,
            self.cfg.n_routed_experts,
            self.cfg.num_experts_per_tok,
            self.kv_cache_dtype,
            self.cost.cache_token_bytes * self.cost.layers
        );
        let _ = writeln!(
            s,
            "ceilings (this process, before the runs): copy {}B/s ({}); GEMM {}FLOP/s ({})",
            si(c.copy_bytes_per_s),
            c.copy_method,
            si(c.gemm_flops_per_s),
            c.gemm_method
        );
        let _ = writeln!(s, "prompts: {}", self.prompts.label());
        let _ = writeln!(
            s,
            "\ndecode, per step: median of {} steps x {} run(s), Model::forward_logits + greedy argmax, \
             KV cache blocks of {} tokens",
            self.new_tokens - 1,
            self.runs,
            self.block_size
        );
        let _ = writeln!(
            s,
            "{:>5} {:>6} {:>8} {:>10} {:>9} {:>13} {:>9} {:>9} {:>9} {:>9} {:>11} {:>7} {:>8}",
            "batch",
            "ctx",
            "distinct",
            "tok/s",
            "step ms",
            "experts/layer",
            "weights",
            "KV read",
            "bytes",
            "FLOP",
            "roofline ms",
            "bound",
            "x roof"
        );
        for r in self.configs {
            let d = &r.decode_cost;
            let _ = writeln!(
                s,
                "{:>5} {:>6.0} {:>8} {:>10.1} {:>9.3} {:>13} {:>8}B {:>8}B {:>8}B {:>9} {:>11.4} {:>7} {:>8.2}",
                r.batch,
                r.context_mean,
                r.distinct_prompts,
                r.tokens_per_s,
                r.step_median_s * 1e3,
                match r.touched.source {
                    NOT_COUNTED => "?".to_string(),
                    "timed steps" | "no MoE layers" => format!("{:.1}", r.touched.mean),
                    _ => format!("{:.1}*", r.touched.mean),
                },
                si(d.weight_bytes + d.expert_bytes),
                si(d.kv_bytes),
                si(d.bytes()),
                si(d.flops()),
                r.roofline_s * 1e3,
                r.bound,
                r.step_median_s / r.roofline_s
            );
        }
        if self.configs.iter().any(|r| r.touched.source == NOT_COUNTED) {
            let _ = writeln!(s, "  ? {NOT_COUNTED}");
        }
        if self
            .configs
            .iter()
            .any(|r| !["timed steps", "no MoE layers", NOT_COUNTED].contains(&r.touched.source))
        {
            let _ = writeln!(
                s,
                "  * experts counted in {} untimed probe steps with host routing (the timed steps \
                 routed on the device)",
                self.probe_steps
            );
        }
        let _ = writeln!(
            s,
            "\nprefill: all prompts, at most {} tokens a step; compute floor = FLOPs / GEMM rate",
            self.prefill_tokens
        );
        let _ = writeln!(
            s,
            "{:>5} {:>6} {:>13} {:>14} {:>12} {:>9} {:>13} {:>8}",
            "batch",
            "ctx",
            "prompt tok/s",
            "TTFT first ms",
            "all ms",
            "FLOP",
            "floor ms",
            "x floor"
        );
        for r in self.configs {
            let _ = writeln!(
                s,
                "{:>5} {:>6.0} {:>13.1} {:>14.3} {:>12.3} {:>9} {:>13.4} {:>8.2}",
                r.batch,
                r.context_mean,
                r.prompt_tokens as f64 / r.prefill_s.max(1e-12),
                r.ttft_first_s * 1e3,
                r.prefill_s * 1e3,
                si(r.prefill_cost.flops()),
                r.prefill_floor_s * 1e3,
                r.prefill_s / r.prefill_floor_s
            );
        }
        for k in self.skipped {
            let _ = writeln!(
                s,
                "skipped batch {} context {}: {}",
                k["batch"],
                k["context"],
                k["reason"].as_str().unwrap_or("")
            );
        }
        if self.prompts.same {
            let _ = writeln!(
                s,
                "NOTE: --same-prompt: every batch is copies of ONE prompt; these numbers hide the MoE cost"
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_si() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        assert_eq!(si(1.5e9), "1.50 G");
        assert_eq!(si(123e6), "123 M");
        assert_eq!(si(12.0), "12.0 ");
    }
}
