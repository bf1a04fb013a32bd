//! Model configuration: parses the `config.json` that DeepSeek-V2 family checkpoints ship and
//! rejects values this implementation does not compute, naming the key.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{CoreError, Result};

/// How routed experts are chosen from the softmax scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TopkMethod {
    /// Plain top-k over all experts.
    Greedy,
    /// DeepSeek-V2 device-limited routing: keep the `topk_group` groups with the best max score,
    /// then top-k inside them.
    GroupLimitedGreedy,
}

/// YaRN RoPE parameters (DeepSeek's `DeepseekV2YarnRotaryEmbedding`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct YarnScaling {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

/// A validated DeepSeek-V2 model configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `None` means the model projects queries with a plain `q_proj` (V2-Lite).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// Zero for a model with no MoE layers.
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub topk_method: TopkMethod,
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f32,
    pub norm_topk_prob: bool,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: Option<YarnScaling>,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub tie_word_embeddings: bool,
}

impl ModelConfig {
    /// Reads and validates `DIR/config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| CoreError::io(&path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            CoreError::Config { msg, .. } => CoreError::Config { path, msg },
            other => other,
        })
    }

    /// Parses a config.json document. Errors name the offending key.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| CoreError::Config {
            path: "config.json".into(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let obj = v.as_object().ok_or_else(|| CoreError::Config {
            path: "config.json".into(),
            msg: "expected a JSON object at the top level".into(),
        })?;
        let r = Reader { obj };

        if let Some(act) = r.opt_str("hidden_act")?
            && act != "silu"
        {
            return Err(unsupported("hidden_act", &act, "only silu is implemented"));
        }
        if let Some(scoring) = r.opt_str("scoring_func")?
            && scoring != "softmax"
        {
            return Err(unsupported(
                "scoring_func",
                &scoring,
                "only softmax gating (DeepSeek-V2) is implemented; sigmoid gating is DeepSeek-V3",
            ));
        }
        if r.opt_bool("attention_bias")?.unwrap_or(false) {
            return Err(unsupported(
                "attention_bias",
                "true",
                "DeepSeek-V2 has no attention bias",
            ));
        }

        let num_attention_heads = r.usize_or("num_attention_heads", 32)?;
        if let Some(kv_heads) = r.opt_usize("num_key_value_heads")?
            && kv_heads != num_attention_heads
        {
            return Err(unsupported(
                "num_key_value_heads",
                &kv_heads.to_string(),
                "MLA shares one latent across heads; num_key_value_heads must equal num_attention_heads",
            ));
        }

        let n_routed_experts = r.opt_usize("n_routed_experts")?.unwrap_or(0);
        let topk_method = match r.opt_str("topk_method")?.as_deref() {
            None | Some("greedy") | Some("gready") => TopkMethod::Greedy,
            Some("group_limited_greedy") => TopkMethod::GroupLimitedGreedy,
            Some(other) => {
                return Err(unsupported(
                    "topk_method",
                    other,
                    "expected greedy or group_limited_greedy (noaux_tc is DeepSeek-V3)",
                ));
            }
        };
        let mut n_group = r.opt_usize("n_group")?.unwrap_or(1).max(1);
        let mut topk_group = r.opt_usize("topk_group")?.unwrap_or(n_group).max(1);
        let num_experts_per_tok = r.opt_usize("num_experts_per_tok")?.unwrap_or(0);
        if topk_method == TopkMethod::Greedy {
            n_group = 1;
            topk_group = 1;
        }

        let (rope_theta_in_params, rope_scaling) = parse_rope(&r)?;
        let rope_theta = match rope_theta_in_params {
            Some(t) => t,
            None => r.opt_f64("rope_theta")?.unwrap_or(10000.0),
        };

        let eos_token_ids = match r.obj.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Number(n)) => vec![as_token_id("eos_token_id", n)?],
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| match i {
                    Value::Number(n) => as_token_id("eos_token_id", n),
                    other => Err(bad(
                        "eos_token_id",
                        &format!("list item {other} is not a token id"),
                    )),
                })
                .collect::<Result<_>>()?,
            Some(other) => return Err(bad("eos_token_id", &format!("{other} is not a token id"))),
        };
        let bos_token_id = match r.obj.get("bos_token_id") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(as_token_id("bos_token_id", n)?),
            Some(other) => return Err(bad("bos_token_id", &format!("{other} is not a token id"))),
        };

        let cfg = ModelConfig {
            vocab_size: r.usize_or("vocab_size", 102400)?,
            hidden_size: r.usize_or("hidden_size", 4096)?,
            intermediate_size: r.usize_or("intermediate_size", 11008)?,
            moe_intermediate_size: r.usize_or("moe_intermediate_size", 1407)?,
            num_hidden_layers: r.usize_or("num_hidden_layers", 30)?,
            num_attention_heads,
            q_lora_rank: r.opt_usize("q_lora_rank")?,
            kv_lora_rank: r.usize_or("kv_lora_rank", 512)?,
            qk_nope_head_dim: r.usize_or("qk_nope_head_dim", 128)?,
            qk_rope_head_dim: r.usize_or("qk_rope_head_dim", 64)?,
            v_head_dim: r.usize_or("v_head_dim", 128)?,
            n_routed_experts,
            n_shared_experts: r.opt_usize("n_shared_experts")?.unwrap_or(0),
            num_experts_per_tok,
            topk_method,
            n_group,
            topk_group,
            routed_scaling_factor: r.opt_f64("routed_scaling_factor")?.unwrap_or(1.0) as f32,
            norm_topk_prob: r.opt_bool("norm_topk_prob")?.unwrap_or(false),
            first_k_dense_replace: r.opt_usize("first_k_dense_replace")?.unwrap_or(0),
            moe_layer_freq: r.opt_usize("moe_layer_freq")?.unwrap_or(1),
            rms_norm_eps: r.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: r.usize_or("max_position_embeddings", 2048)?,
            bos_token_id,
            eos_token_ids,
            tie_word_embeddings: r.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("moe_layer_freq", self.moe_layer_freq),
        ] {
            if v == 0 {
                return Err(bad(key, "must be a positive integer"));
            }
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(bad("qk_rope_head_dim", "must be even (RoPE rotates pairs)"));
        }
        if self.q_lora_rank == Some(0) {
            return Err(bad("q_lora_rank", "must be null or a positive integer"));
        }
        if self.n_routed_experts > 0 {
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.n_routed_experts {
                return Err(bad(
                    "num_experts_per_tok",
                    &format!(
                        "must be between 1 and n_routed_experts ({}), got {}",
                        self.n_routed_experts, self.num_experts_per_tok
                    ),
                ));
            }
            if !self.n_routed_experts.is_multiple_of(self.n_group) {
                return Err(bad(
                    "n_group",
                    &format!(
                        "{} does not divide n_routed_experts {}",
                        self.n_group, self.n_routed_experts
                    ),
                ));
            }
            if self.topk_group > self.n_group {
                return Err(bad(
                    "topk_group",
                    &format!("{} exceeds n_group {}", self.topk_group, self.n_group),
                ));
            }
            let reachable = self.topk_group * (self.n_routed_experts / self.n_group);
            if reachable < self.num_experts_per_tok {
                return Err(bad(
                    "topk_group",
                    &format!(
                        "the best {} groups hold only {reachable} experts, fewer than num_experts_per_tok {}",
                        self.topk_group, self.num_experts_per_tok
                    ),
                ));
            }
        }
        if let Some(y) = &self.rope_scaling
            && (y.factor <= 0.0 || y.original_max_position_embeddings == 0)
        {
            return Err(bad(
                "rope_scaling",
                "factor and original_max_position_embeddings must be positive",
            ));
        }
        Ok(())
    }

    /// Whether layer `layer` uses a routed-expert MoE block (else a dense MLP), as in
    /// `DeepseekV2DecoderLayer`.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.n_routed_experts > 0
            && layer >= self.first_k_dense_replace
            && layer.is_multiple_of(self.moe_layer_freq)
    }

    /// Indices of the MoE layers.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers)
            .filter(|&l| self.is_moe_layer(l))
            .collect()
    }

    pub fn q_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Values cached per token per layer: the compressed latent plus the shared RoPE key.
    pub fn latent_cache_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// Softmax scale: q_head_dim^-0.5, times mscale(factor, mscale_all_dim)² under YaRN.
    pub fn softmax_scale(&self) -> f32 {
        let mut scale = (self.q_head_dim() as f64).powf(-0.5);
        if let Some(y) = &self.rope_scaling
            && y.mscale_all_dim != 0.0
        {
            let m = yarn_get_mscale(y.factor, y.mscale_all_dim);
            scale *= m * m;
        }
        scale as f32
    }

    /// Intermediate size of the shared-experts MLP (all shared experts fused into one MLP).
    pub fn shared_intermediate_size(&self) -> usize {
        self.moe_intermediate_size * self.n_shared_experts
    }

    /// A stable fingerprint of the parsed configuration: shards and router compare it to make
    /// sure they serve the same model.
    pub fn fingerprint(&self) -> String {
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(&canonical);
        digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
    }
}

/// DeepSeek's `yarn_get_mscale`.
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

fn parse_rope(r: &Reader<'_>) -> Result<(Option<f64>, Option<YarnScaling>)> {
    // Newer transformers write `rope_parameters` (with rope_theta inside); checkpoints write
    // `rope_scaling`. Accept either.
    let (key, params) = match (r.obj.get("rope_parameters"), r.obj.get("rope_scaling")) {
        (Some(p @ Value::Object(_)), _) => ("rope_parameters", p),
        (_, Some(p @ Value::Object(_))) => ("rope_scaling", p),
        (_, Some(Value::Null)) | (_, None) => return Ok((None, None)),
        (_, Some(other)) => return Err(bad("rope_scaling", &format!("{other} is not an object"))),
    };
    let Some(obj) = params.as_object() else {
        return Ok((None, None));
    };
    let sub = Reader { obj };
    let theta = sub.opt_f64("rope_theta")?;
    let kind = match (sub.opt_str("type")?, sub.opt_str("rope_type")?) {
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) => "default".to_string(),
    };
    match kind.as_str() {
        "default" => Ok((theta, None)),
        "yarn" => {
            let factor = sub
                .opt_f64("factor")?
                .ok_or_else(|| bad(key, "yarn scaling needs `factor`"))?;
            let original = sub
                .opt_usize("original_max_position_embeddings")?
                .ok_or_else(|| bad(key, "yarn scaling needs `original_max_position_embeddings`"))?;
            Ok((
                theta,
                Some(YarnScaling {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: sub.opt_f64("beta_fast")?.unwrap_or(32.0),
                    beta_slow: sub.opt_f64("beta_slow")?.unwrap_or(1.0),
                    mscale: sub.opt_f64("mscale")?.unwrap_or(1.0),
                    mscale_all_dim: sub.opt_f64("mscale_all_dim")?.unwrap_or(0.0),
                }),
            ))
        }
        other => Err(CoreError::Unsupported {
            key: if key == "rope_parameters" {
                "rope_parameters.rope_type"
            } else {
                "rope_scaling.type"
            },
            value: format!("\"{other}\""),
            why: "only yarn (and no scaling) are implemented".into(),
        }),
    }
}

fn unsupported(key: &'static str, value: &str, why: &str) -> CoreError {
    CoreError::Unsupported {
        key,
        value: format!("\"{value}\""),
        why: why.into(),
    }
}

fn bad(key: &str, msg: &str) -> CoreError {
    CoreError::Config {
        path: "config.json".into(),
        msg: format!("key `{key}`: {msg}"),
    }
}

fn as_token_id(key: &str, n: &serde_json::Number) -> Result<u32> {
    n.as_u64()
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| bad(key, &format!("{n} is not a token id")))
}

struct Reader<'a> {
    obj: &'a serde_json::Map<String, Value>,
}

impl Reader<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        match self.obj.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(|v| Some(v as usize))
                .ok_or_else(|| bad(key, &format!("expected a non-negative integer, got {n}"))),
            Some(other) => Err(bad(
                key,
                &format!("expected a non-negative integer, got {other}"),
            )),
        }
    }
    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(other) => Err(bad(key, &format!("expected a number, got {other}"))),
        }
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(bad(key, &format!("expected true or false, got {other}"))),
        }
    }
    fn opt_str(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(bad(key, &format!("expected a string, got {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// deepseek-ai/DeepSeek-V2's config.json (the keys that matter).
    pub(crate) const DEEPSEEK_V2: &str = r#"{
      "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": false, "bos_token_id": 100000,
      "eos_token_id": 100001, "ep_size": 1, "first_k_dense_replace": 1, "hidden_act": "silu",
      "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 12288, "kv_lora_rank": 512,
      "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1536,
      "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 160, "n_shared_experts": 2,
      "norm_topk_prob": false, "num_attention_heads": 128, "num_experts_per_tok": 6,
      "num_hidden_layers": 60, "num_key_value_heads": 128, "pretraining_tp": 1, "q_lora_rank": 1536,
      "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
      "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
        "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
      "rope_theta": 10000, "routed_scaling_factor": 16.0, "scoring_func": "softmax", "seq_aux": true,
      "tie_word_embeddings": false, "topk_group": 3, "topk_method": "group_limited_greedy",
      "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 102400}"#;

    /// deepseek-ai/DeepSeek-V2-Lite's config.json (the keys that matter).
    const DEEPSEEK_V2_LITE: &str = r#"{
      "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
      "hidden_size": 2048, "intermediate_size": 10944, "kv_lora_rank": 512,
      "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "moe_layer_freq": 1,
      "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": false,
      "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
      "num_key_value_heads": 16, "q_lora_rank": null, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
      "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40,
        "mscale": 0.707, "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
      "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
      "tie_word_embeddings": false, "topk_group": 1, "topk_method": "greedy", "v_head_dim": 128,
      "vocab_size": 102400}"#;

    fn with(base: &str, key: &str, value: &str) -> String {
        let mut v: Value = serde_json::from_str(base).unwrap();
        v[key] = serde_json::from_str(value).unwrap();
        v.to_string()
    }

    #[test]
    fn parses_deepseek_v2() {
        let c = ModelConfig::from_json_str(DEEPSEEK_V2).unwrap();
        assert_eq!(c.q_lora_rank, Some(1536));
        assert_eq!(c.topk_method, TopkMethod::GroupLimitedGreedy);
        assert_eq!((c.n_group, c.topk_group), (8, 3));
        assert_eq!(c.routed_scaling_factor, 16.0);
        assert_eq!(c.latent_cache_width(), 576);
        assert!(!c.is_moe_layer(0));
        assert!(c.is_moe_layer(1) && c.is_moe_layer(59));
        assert_eq!(c.moe_layers().len(), 59);
        assert_eq!(c.eos_token_ids, vec![100001]);
        let y = c.rope_scaling.as_ref().unwrap();
        assert_eq!(y.factor, 40.0);
        assert_eq!(y.original_max_position_embeddings, 4096);
        // 192^-0.5 * (0.1*0.707*ln 40 + 1)^2
        let expected = (192f64).powf(-0.5) * (0.1 * 0.707 * 40f64.ln() + 1.0).powi(2);
        assert!((c.softmax_scale() as f64 - expected).abs() < 1e-7);
    }

    #[test]
    fn parses_v2_lite_without_q_lora() {
        let c = ModelConfig::from_json_str(DEEPSEEK_V2_LITE).unwrap();
        assert_eq!(c.q_lora_rank, None);
        assert_eq!(c.topk_method, TopkMethod::Greedy);
        assert_eq!(c.n_routed_experts, 64);
    }

    #[test]
    fn accepts_rope_parameters_spelling() {
        let mut v: Value = serde_json::from_str(DEEPSEEK_V2).unwrap();
        let obj = v.as_object_mut().unwrap();
        obj.remove("rope_scaling");
        obj.remove("rope_theta");
        obj.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "yarn", "rope_theta": 20000.0, "factor": 40,
              "original_max_position_embeddings": 4096, "mscale": 0.707, "mscale_all_dim": 0.707,
              "beta_fast": 32, "beta_slow": 1}),
        );
        let c = ModelConfig::from_json_str(&v.to_string()).unwrap();
        assert_eq!(c.rope_theta, 20000.0);
        assert_eq!(c.rope_scaling.unwrap().factor, 40.0);
    }

    #[test]
    fn eos_may_be_a_list() {
        let c =
            ModelConfig::from_json_str(&with(DEEPSEEK_V2, "eos_token_id", "[100001, 7]")).unwrap();
        assert_eq!(c.eos_token_ids, vec![100001, 7]);
    }

    #[test]
    fn rejects_sigmoid_scoring_naming_the_key() {
        let err = ModelConfig::from_json_str(&with(DEEPSEEK_V2, "scoring_func", "\"sigmoid\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("scoring_func") && err.contains("sigmoid"),
            "{err}"
        );
    }

    #[test]
    fn rejects_unknown_topk_method_and_rope_type() {
        let err = ModelConfig::from_json_str(&with(DEEPSEEK_V2, "topk_method", "\"noaux_tc\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("topk_method") && err.contains("noaux_tc"),
            "{err}"
        );
        let err = ModelConfig::from_json_str(&with(
            DEEPSEEK_V2,
            "rope_scaling",
            r#"{"type": "dynamic", "factor": 2}"#,
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("rope_scaling.type") && err.contains("dynamic"),
            "{err}"
        );
    }

    #[test]
    fn rejects_bad_values_naming_the_key() {
        for (key, value) in [
            ("hidden_size", "\"big\""),
            ("hidden_size", "0"),
            ("n_group", "7"),
            ("topk_group", "9"),
            ("num_experts_per_tok", "0"),
            ("norm_topk_prob", "1"),
            ("hidden_act", "\"gelu\""),
            ("qk_rope_head_dim", "63"),
            ("num_key_value_heads", "1"),
        ] {
            let err = ModelConfig::from_json_str(&with(DEEPSEEK_V2, key, value))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(key),
                "error for {key}={value} does not name it: {err}"
            );
        }
        let err = ModelConfig::from_json_str("{not json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid JSON"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = ModelConfig::from_model_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("config.json"), "{err}");
    }

    #[test]
    fn fingerprint_is_stable_and_sensitive() {
        let a = ModelConfig::from_json_str(DEEPSEEK_V2).unwrap();
        let b = ModelConfig::from_json_str(DEEPSEEK_V2).unwrap();
        let c = ModelConfig::from_json_str(&with(DEEPSEEK_V2, "num_hidden_layers", "59")).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
    }
}
