//! `dsv2 init-random`: a checkpoint in the exact Hugging Face layout with real DeepSeek-V2 or
//! V2-Lite dims and random bf16 weights, generated chunk-wise from a seeded RNG and streamed to
//! disk with the conversion writer (one real V2 MoE layer is ~7.5 GB: nothing is held in
//! memory). Files of at most ~5 GB with `model.safetensors.index.json`, written last. No
//! tokenizer is written: the real vocabulary has 102400 tokens and its tokenizer is DeepSeek's.

use std::collections::BTreeMap;
use std::path::PathBuf;

use dsv2_core::ModelConfig;
use dsv2_core::weights::DType;
use rayon::prelude::*;

use crate::Progress;
use crate::error::{ConvertError, Result};
use crate::expected::expected_tensors;
use crate::writer::{OutFile, OutTensor, Piece, Source, write_atomic, write_file};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    DeepseekV2,
    DeepseekV2Lite,
}

impl Preset {
    /// The original config.json of deepseek-ai/DeepSeek-V2 or DeepSeek-V2-Lite (the values
    /// `dsv2_core::config` tests parse), with `num_hidden_layers` set to `layers`.
    pub fn config_json(self, layers: usize) -> serde_json::Value {
        let mut v = match self {
            Preset::DeepseekV2 => serde_json::json!({
                "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": false,
                "attention_dropout": 0.0, "aux_loss_alpha": 0.001,
                "auto_map": {
                    "AutoConfig": "configuration_deepseek.DeepseekV2Config",
                    "AutoModel": "modeling_deepseek.DeepseekV2Model",
                    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"
                },
                "bos_token_id": 100000, "eos_token_id": 100001, "ep_size": 1,
                "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 5120,
                "initializer_range": 0.02, "intermediate_size": 12288, "kv_lora_rank": 512,
                "max_position_embeddings": 163840, "model_type": "deepseek_v2",
                "moe_intermediate_size": 1536, "moe_layer_freq": 1, "n_group": 8,
                "n_routed_experts": 160, "n_shared_experts": 2, "norm_topk_prob": false,
                "num_attention_heads": 128, "num_experts_per_tok": 6, "num_hidden_layers": 60,
                "num_key_value_heads": 128, "pretraining_tp": 1, "q_lora_rank": 1536,
                "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
                "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                    "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                    "type": "yarn"},
                "rope_theta": 10000, "routed_scaling_factor": 16.0, "scoring_func": "softmax",
                "seq_aux": true, "tie_word_embeddings": false, "topk_group": 3,
                "topk_method": "group_limited_greedy", "torch_dtype": "bfloat16",
                "transformers_version": "4.39.3", "use_cache": true, "v_head_dim": 128,
                "vocab_size": 102400
            }),
            Preset::DeepseekV2Lite => serde_json::json!({
                "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": false,
                "attention_dropout": 0.0, "aux_loss_alpha": 0.001,
                "auto_map": {
                    "AutoConfig": "configuration_deepseek.DeepseekV2Config",
                    "AutoModel": "modeling_deepseek.DeepseekV2Model",
                    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"
                },
                "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
                "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
                "intermediate_size": 10944, "kv_lora_rank": 512,
                "max_position_embeddings": 163840, "model_type": "deepseek_v2",
                "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
                "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": false,
                "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
                "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": null,
                "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
                "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                    "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                    "type": "yarn"},
                "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
                "seq_aux": true, "tie_word_embeddings": false, "topk_group": 1,
                "topk_method": "greedy", "torch_dtype": "bfloat16",
                "transformers_version": "4.33.1", "use_cache": true, "v_head_dim": 128,
                "vocab_size": 102400
            }),
        };
        v["num_hidden_layers"] = serde_json::json!(layers);
        v
    }
}

#[derive(Debug, Clone)]
pub struct InitOptions {
    /// A DeepSeek-V2 config.json (`Preset::config_json`, or any other, e.g. scaled for tests).
    pub config: serde_json::Value,
    pub out: PathBuf,
    pub seed: u64,
    pub threads: usize,
    pub max_file_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    pub files: Vec<String>,
    pub total_bytes: u64,
}

/// Writes config.json, the weight files and (last) model.safetensors.index.json into `out`.
pub fn init_random(opts: &InitOptions, progress: &dyn Progress) -> Result<InitReport> {
    let text = opts.config.to_string();
    let cfg = ModelConfig::from_json_str(&text)?;
    let out = &opts.out;
    std::fs::create_dir_all(out).map_err(|e| ConvertError::io(out, e))?;
    let index_path = out.join("model.safetensors.index.json");
    if index_path.exists() {
        std::fs::remove_file(&index_path).map_err(|e| ConvertError::io(&index_path, e))?;
    }
    // Tensor i draws from its own stream, so files can be generated in parallel and the result
    // does not depend on the thread count.
    let tensors: Vec<OutTensor> = expected_tensors(&cfg)
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let numel = e.shape.iter().product();
            OutTensor {
                name: e.name.clone(),
                dtype: DType::Bf16,
                shape: e.shape.clone(),
                pieces: vec![Piece {
                    name: e.name,
                    shape: e.shape,
                    source: Source::Random {
                        seed: dsv2_core::layout::tensor_seed(opts.seed, i),
                        mean: e.init.mean,
                        std: e.init.std,
                        numel,
                    },
                }],
            }
        })
        .collect();
    // Pack in order into files of at most max_file_bytes.
    let mut groups: Vec<Vec<OutTensor>> = vec![Vec::new()];
    let mut cur = 0u64;
    for t in tensors {
        let last = groups.last().map_or(0, |g| g.len());
        if last > 0 && cur + t.bytes() > opts.max_file_bytes {
            groups.push(Vec::new());
            cur = 0;
        }
        cur += t.bytes();
        if let Some(g) = groups.last_mut() {
            g.push(t);
        }
    }
    let n = groups.len();
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let files: Vec<OutFile> = groups
        .into_iter()
        .enumerate()
        .map(|(k, tensors)| OutFile {
            rel: format!("model-{:05}-of-{n:05}.safetensors", k + 1),
            tensors,
            metadata: meta.clone(),
        })
        .collect();
    let total: u64 = files.iter().map(|f| f.data_bytes()).sum();
    write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&opts.config)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    progress.start(total);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.max(1))
        .build()
        .map_err(|e| ConvertError::Invalid(format!("thread pool: {e}")))?;
    pool.install(|| {
        files
            .par_iter()
            .map(|f| write_file(out, f, progress).map(|_| ()))
            .collect::<Result<Vec<()>>>()
    })?;
    let mut weight_map = serde_json::Map::new();
    for f in &files {
        for t in &f.tensors {
            weight_map.insert(t.name.clone(), serde_json::json!(f.rel));
        }
    }
    let index = serde_json::json!({
        "metadata": {"total_size": total},
        "weight_map": weight_map,
    });
    write_atomic(
        &index_path,
        serde_json::to_string_pretty(&index)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    Ok(InitReport {
        files: files.into_iter().map(|f| f.rel).collect(),
        total_bytes: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_with_real_dims() {
        let v2 =
            ModelConfig::from_json_str(&Preset::DeepseekV2.config_json(60).to_string()).unwrap();
        assert_eq!(
            (v2.hidden_size, v2.n_routed_experts, v2.q_lora_rank),
            (5120, 160, Some(1536))
        );
        let lite =
            ModelConfig::from_json_str(&Preset::DeepseekV2Lite.config_json(2).to_string()).unwrap();
        assert_eq!(
            (lite.hidden_size, lite.n_routed_experts, lite.q_lora_rank),
            (2048, 64, None)
        );
        assert_eq!(lite.num_hidden_layers, 2);
        // One real V2 MoE layer's routed experts: 160 × 3 × 1536 × 5120 bf16 ≈ 7.5 GB.
        let bytes: usize = expected_tensors(&v2)
            .iter()
            .filter(|e| e.name.starts_with("model.layers.1.mlp.experts."))
            .map(|e| e.shape.iter().product::<usize>() * 2)
            .sum();
        assert_eq!(bytes, 160 * 3 * 1536 * 5120 * 2);
    }
}
