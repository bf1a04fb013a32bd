//! The tensors a DeepSeek-V2 checkpoint must hold for a given config: Hugging Face name, shape
//! and the random init used by `init-random`, in the checkpoint's natural order. Conversion
//! checks every source tensor against this list. The names mirror `dsv2_core::model::Model::load`
//! and `LocalExperts::load`; a test keeps the list equal to `dsv2_core::tiny::random_tensors`.

use dsv2_core::ModelConfig;

/// How `init-random` fills a tensor: N(mean, std).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Init {
    pub mean: f32,
    pub std: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

/// Std of linear weights in random checkpoints (DeepSeek's `initializer_range`).
const LIN: f32 = 0.02;

pub fn expected_tensors(c: &ModelConfig) -> Vec<Expected> {
    let mut out = Vec::new();
    let mut t = |name: String, shape: Vec<usize>, mean: f32, std: f32| {
        out.push(Expected {
            name,
            shape,
            init: Init { mean, std },
        })
    };
    let (h, heads) = (c.hidden_size, c.num_attention_heads);
    t(
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, h],
        0.0,
        1.0,
    );
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let a = format!("{p}.self_attn");
        t(format!("{p}.input_layernorm.weight"), vec![h], 1.0, 0.1);
        t(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            1.0,
            0.1,
        );
        match c.q_lora_rank {
            Some(r) => {
                t(format!("{a}.q_a_proj.weight"), vec![r, h], 0.0, LIN);
                t(format!("{a}.q_a_layernorm.weight"), vec![r], 1.0, 0.1);
                t(
                    format!("{a}.q_b_proj.weight"),
                    vec![heads * c.q_head_dim(), r],
                    0.0,
                    LIN,
                );
            }
            None => t(
                format!("{a}.q_proj.weight"),
                vec![heads * c.q_head_dim(), h],
                0.0,
                LIN,
            ),
        }
        t(
            format!("{a}.kv_a_proj_with_mqa.weight"),
            vec![c.latent_cache_width(), h],
            0.0,
            LIN,
        );
        t(
            format!("{a}.kv_a_layernorm.weight"),
            vec![c.kv_lora_rank],
            1.0,
            0.1,
        );
        t(
            format!("{a}.kv_b_proj.weight"),
            vec![heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank],
            0.0,
            LIN,
        );
        t(
            format!("{a}.o_proj.weight"),
            vec![h, heads * c.v_head_dim],
            0.0,
            LIN,
        );
        let mut mlp = |prefix: String, inter: usize| {
            t(
                format!("{prefix}.gate_proj.weight"),
                vec![inter, h],
                0.0,
                LIN,
            );
            t(format!("{prefix}.up_proj.weight"), vec![inter, h], 0.0, LIN);
            t(
                format!("{prefix}.down_proj.weight"),
                vec![h, inter],
                0.0,
                LIN,
            );
        };
        if c.is_moe_layer(l) {
            for e in 0..c.n_routed_experts {
                mlp(format!("{p}.mlp.experts.{e}"), c.moe_intermediate_size);
            }
            if c.n_shared_experts > 0 {
                mlp(
                    format!("{p}.mlp.shared_experts"),
                    c.shared_intermediate_size(),
                );
            }
            t(
                format!("{p}.mlp.gate.weight"),
                vec![c.n_routed_experts, h],
                0.0,
                0.2,
            );
        } else {
            mlp(format!("{p}.mlp"), c.intermediate_size);
        }
    }
    t("model.norm.weight".into(), vec![h], 1.0, 0.1);
    if !c.tie_word_embeddings {
        t("lm_head.weight".into(), vec![c.vocab_size, h], 0.0, LIN);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_tiny_models_tensor_list() {
        let cfg = ModelConfig::from_json_str(&dsv2_core::tiny::config_json().to_string()).unwrap();
        let ours: Vec<(String, Vec<usize>)> = expected_tensors(&cfg)
            .into_iter()
            .map(|e| (e.name, e.shape))
            .collect();
        let tiny: Vec<(String, Vec<usize>)> = dsv2_core::tiny::random_tensors(&cfg, 1)
            .into_iter()
            .map(|(n, s, _)| (n, s))
            .collect();
        assert_eq!(ours, tiny);
    }
}
