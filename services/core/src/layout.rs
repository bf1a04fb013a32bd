//! The tensors a DeepSeek-V2 checkpoint holds for a config: Hugging Face name, shape and the
//! random init used for generated checkpoints, in the checkpoint's natural order. The one
//! description of the layout that the tiny model, `dsv2 init-random` and conversion share (the
//! loader in model.rs fetches the same names, and the tiny-model test proves they agree).

use crate::ModelConfig;

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
pub const LINEAR_STD: f32 = 0.02;

/// The RNG seed of the `index`-th tensor of [`expected_tensors`] in a random checkpoint drawn
/// with `seed`: each tensor has its own stream, so files can be generated in parallel and a
/// random store ([`crate::weights::WeightStore::random`]) reproduces a written one.
pub fn tensor_seed(seed: u64, index: usize) -> u64 {
    seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
        .wrapping_add((index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Every tensor of a checkpoint for `c`, in the checkpoint's natural order; linear weights get
/// N(0, `linear_std`) when generated.
pub fn expected_tensors(c: &ModelConfig, linear_std: f32) -> Vec<Expected> {
    let lin = linear_std;
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
                t(format!("{a}.q_a_proj.weight"), vec![r, h], 0.0, lin);
                t(format!("{a}.q_a_layernorm.weight"), vec![r], 1.0, 0.1);
                t(
                    format!("{a}.q_b_proj.weight"),
                    vec![heads * c.q_head_dim(), r],
                    0.0,
                    lin,
                );
            }
            None => t(
                format!("{a}.q_proj.weight"),
                vec![heads * c.q_head_dim(), h],
                0.0,
                lin,
            ),
        }
        t(
            format!("{a}.kv_a_proj_with_mqa.weight"),
            vec![c.latent_cache_width(), h],
            0.0,
            lin,
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
            lin,
        );
        t(
            format!("{a}.o_proj.weight"),
            vec![h, heads * c.v_head_dim],
            0.0,
            lin,
        );
        let mut mlp = |prefix: String, inter: usize| {
            t(
                format!("{prefix}.gate_proj.weight"),
                vec![inter, h],
                0.0,
                lin,
            );
            t(format!("{prefix}.up_proj.weight"), vec![inter, h], 0.0, lin);
            t(
                format!("{prefix}.down_proj.weight"),
                vec![h, inter],
                0.0,
                lin,
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
        t("lm_head.weight".into(), vec![c.vocab_size, h], 0.0, lin);
    }
    out
}
