//! Two config.json keys of issue 2 (item 2) that the golden fixtures leave at one value:
//! `moe_layer_freq` (which layers are MoE) and `tie_word_embeddings` (lm_head = embedding).

use std::path::Path;
use std::sync::Arc;

use dsv2_core::ModelConfig;
use dsv2_core::backend::AttnMode;
use dsv2_core::cpu::CpuBackend;
use dsv2_core::model::{load_local, position_logits};
use safetensors::tensor::TensorView;

fn v2_lite() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/v2-lite")
}

#[test]
fn moe_layer_freq_picks_moe_layers_like_hf() {
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(v2_lite().join("config.json")).unwrap())
            .unwrap();
    cfg["num_hidden_layers"] = 7.into();
    cfg["first_k_dense_replace"] = 1.into();
    cfg["moe_layer_freq"] = 2.into();
    let c = ModelConfig::from_json_str(&cfg.to_string()).unwrap();
    // DeepseekV2DecoderLayer: MoE iff layer >= first_k_dense_replace and layer % freq == 0.
    assert_eq!(c.moe_layers(), vec![2, 4, 6]);
    cfg["moe_layer_freq"] = 0.into();
    let err = ModelConfig::from_json_str(&cfg.to_string())
        .unwrap_err()
        .to_string();
    assert!(err.contains("moe_layer_freq"), "{err}");
}

/// Copies the v2-lite fixture (f32, one file) into `dir` with `tie_word_embeddings = tie`;
/// `lm_head.weight` becomes a copy of the embedding (untied) or is left out (tied).
fn write_variant(dir: &Path, tie: bool) {
    let src = v2_lite();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["tie_word_embeddings"] = tie.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let embed = st.tensor("model.embed_tokens.weight").unwrap();
    let mut views: Vec<(String, TensorView<'_>)> = Vec::new();
    for (name, t) in st.tensors() {
        if name == "lm_head.weight" {
            if !tie {
                views.push((name, embed.clone()));
            }
        } else {
            views.push((name, t));
        }
    }
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

#[test]
fn tied_embeddings_use_the_embedding_as_lm_head() {
    let untied = tempfile::tempdir().unwrap();
    let tied = tempfile::tempdir().unwrap();
    write_variant(untied.path(), false);
    write_variant(tied.path(), true);
    let tokens = [1u32, 7, 42, 300, 5];
    let logits = |dir: &Path| {
        let (model, experts) = load_local(Arc::new(CpuBackend), dir).unwrap();
        position_logits(&model, &experts, &tokens, None, AttnMode::Auto).unwrap()
    };
    // The tied checkpoint has no lm_head.weight at all: loading it proves the key is honoured.
    let a = logits(untied.path());
    let b = logits(tied.path());
    assert_eq!(a.len(), b.len());
    let max_diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max_diff < 1e-5, "tied vs untied-with-embedding: {max_diff}");
    // And the embedding really differs from the fixture's own lm_head, so the check has teeth.
    let orig = logits(&v2_lite());
    let diff = orig
        .iter()
        .zip(&a)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff > 1e-2, "lm_head swap changed nothing ({diff})");
}
