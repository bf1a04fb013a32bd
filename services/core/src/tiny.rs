//! The embedded tiny models, written on first use into a cache dir in the exact Hugging Face
//! layout so the whole system runs anywhere with no GPU and no download. `tiny` is the trained
//! one (`trained`: it writes English); `tiny-random` is a DeepSeek-V2-architecture checkpoint
//! with random weights from a fixed seed and a small byte-level BPE trained here on an embedded
//! text (its text is noise; tests that pin its outputs use it).

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use safetensors::tensor::TensorView;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, TokenizerImpl,
};

use crate::error::{CoreError, Result};

mod trained;
pub use trained::{TRAINED_VERSION, ensure_trained, write_trained_to};

/// Bump when the model or tokenizer recipe changes: a new directory is made.
pub const TINY_VERSION: &str = "tiny-v2";
const SEED: u64 = 0x05EE_D0D5_2024;
const CORPUS: &str = include_str!("tiny_corpus.txt");
pub const BOS: &str = "<｜begin▁of▁sentence｜>";
pub const EOS: &str = "<｜end▁of▁sentence｜>";
/// The tiny model's chat template (in its tokenizer_config.json): DeepSeek-V2-Chat's turn
/// format, but an unknown role is an error instead of being dropped.
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}\
{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}\
{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}\
{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}\
{% else %}{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}\
{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";

/// The tiny model's config.json, in DeepSeek's original format.
pub fn config_json() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 384,
        "moe_intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 4, "q_lora_rank": 96, "kv_lora_rank": 64,
        "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
        "n_routed_experts": 32, "n_shared_experts": 2, "num_experts_per_tok": 6,
        "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3,
        "routed_scaling_factor": 16.0, "norm_topk_prob": false, "scoring_func": "softmax",
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 64,
            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        "max_position_embeddings": 2560, "bos_token_id": 0, "eos_token_id": 1,
        "tie_word_embeddings": false, "attention_bias": false, "torch_dtype": "bfloat16"
    })
}

/// Returns the random tiny model's directory under `cache_root`, creating it if needed.
pub fn ensure(cache_root: &Path) -> Result<PathBuf> {
    let dir = cache_root.join(TINY_VERSION);
    if dir.join("model.safetensors").exists() && dir.join("tokenizer.json").exists() {
        return Ok(dir);
    }
    publish(cache_root, TINY_VERSION, write_to)?;
    Ok(dir)
}

/// Writes a model dir with `write` into a temp dir, then renames it to `cache_root/name`.
fn publish(cache_root: &Path, name: &str, write: fn(&Path) -> Result<()>) -> Result<()> {
    let dir = cache_root.join(name);
    std::fs::create_dir_all(cache_root).map_err(|e| CoreError::io(cache_root, e))?;
    // unique per call, not just per process: tests call this from several threads at once, and
    // a shared temp dir let one thread delete or overwrite another's half-written model
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = cache_root.join(format!("{name}.tmp-{}-{call}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    write(&tmp)?;
    // Atomic publish: a concurrent creator may win the rename; its result is identical.
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join("model.safetensors").exists() {
            return Err(CoreError::File {
                path: dir,
                msg: "could not create the tiny model here".into(),
            });
        }
    }
    Ok(())
}

/// Writes the whole tiny model dir (config, weights, tokenizer) into `dir`.
pub fn write_to(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
    let cfg = config_json();
    let cfg_path = dir.join("config.json");
    std::fs::write(
        &cfg_path,
        serde_json::to_string_pretty(&cfg).unwrap_or_default(),
    )
    .map_err(|e| CoreError::io(&cfg_path, e))?;
    let parsed = crate::config::ModelConfig::from_json_str(&cfg.to_string())?;
    write_random_weights(&parsed, SEED, &dir.join("model.safetensors"))?;
    write_tokenizer(dir, parsed.vocab_size)?;
    Ok(())
}

/// Every tensor of a DeepSeek-V2 checkpoint with these dims, random from `seed`, stored bf16.
pub fn write_random_weights(c: &crate::ModelConfig, seed: u64, path: &Path) -> Result<()> {
    write_bf16_tensors(random_tensors(c, seed), path)
}

/// Writes (name, shape, values) tensors as one bf16 safetensors file, the format of the
/// checkpoints this crate writes (also how a test derives a model from a fixture's tensors).
pub fn write_bf16_tensors(tensors: Vec<(String, Vec<usize>, Vec<f32>)>, path: &Path) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| {
            (
                n,
                s,
                v.iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect(),
            )
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(safetensors::Dtype::BF16, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| CoreError::File {
                    path: path.to_path_buf(),
                    msg: format!("tensor {n}: {e}"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| CoreError::File {
        path: path.to_path_buf(),
        msg: format!("cannot write: {e}"),
    })
}

/// (name, shape, values) for every tensor, in the layout's order, drawn from one seeded stream.
pub fn random_tensors(c: &crate::ModelConfig, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    crate::layout::expected_tensors(c, 0.05)
        .into_iter()
        .map(|t| {
            let n: usize = t.shape.iter().product();
            let dist = Normal::new(t.init.mean, t.init.std)
                .unwrap_or_else(|_| Normal::new(0.0, 1.0).expect("valid"));
            let v: Vec<f32> = (0..n).map(|_| dist.sample(&mut rng)).collect();
            (t.name, t.shape, v)
        })
        .collect()
}

type RawTokenizer = TokenizerImpl<
    ModelWrapper,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// Trains a byte-level BPE on the embedded corpus and writes tokenizer.json and
/// tokenizer_config.json (BOS added to prompts, as DeepSeek's config says; a chat template).
fn write_tokenizer(dir: &Path, vocab_size: usize) -> Result<()> {
    train_tokenizer(dir, vocab_size, CORPUS.lines(), CHAT_TEMPLATE)
}

/// Our byte-level BPE recipe (the tiny models' tokenizer): trains on `lines` with BOS and EOS
/// as the first two ids and writes `dir/tokenizer.json` plus a `tokenizer_config.json` holding
/// `chat_template`. The trained tiny model's script runs this too (examples/train_tokenizer.rs),
/// so both tiny models' tokenizers are the format the product loads.
pub fn train_tokenizer<'a>(
    dir: &Path,
    vocab_size: usize,
    lines: impl Iterator<Item = &'a str> + Send,
    chat_template: &str,
) -> Result<()> {
    let tk_err = |e: Box<dyn std::error::Error + Send + Sync>| {
        CoreError::Tokenizer(format!("training the tiny tokenizer: {e}"))
    };
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![
            AddedToken::from(BOS, true),
            AddedToken::from(EOS, true),
        ])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = tokenizers::models::TrainerWrapper::BpeTrainer(trainer);
    let mut tk: RawTokenizer = TokenizerImpl::new(ModelWrapper::BPE(BPE::default()));
    tk.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, true, true,
    ))));
    tk.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    tk.train(&mut trainer, lines).map_err(tk_err)?;
    let path = dir.join("tokenizer.json");
    tk.save(&path, true).map_err(tk_err)?;
    let tcfg = serde_json::json!({
        "add_bos_token": true, "add_eos_token": false,
        "bos_token": {"content": BOS, "special": true},
        "eos_token": {"content": EOS, "special": true},
        "model_max_length": 2560, "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": chat_template
    });
    let p = dir.join("tokenizer_config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&tcfg).unwrap_or_default())
        .map_err(|e| CoreError::io(&p, e))
}

/// Where the tiny model is cached, from the values of DSV2_CACHE_DIR, XDG_CACHE_HOME and HOME
/// (the binaries read the environment; this library does not).
pub fn cache_root(
    dsv2_cache_dir: Option<String>,
    xdg_cache_home: Option<String>,
    home: Option<String>,
) -> PathBuf {
    if let Some(d) = dsv2_cache_dir.filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(x) = xdg_cache_home.filter(|d| !d.is_empty()) {
        return Path::new(&x).join("dsv2");
    }
    if let Some(h) = home.filter(|d| !d.is_empty()) {
        return Path::new(&h).join(".cache").join("dsv2");
    }
    std::env::temp_dir().join("dsv2-cache")
}

/// `tiny` means the embedded trained tiny model and `tiny-random` the random one (each created
/// under `cache_root` on first use); anything else is a path to a model dir.
pub fn resolve_model_dir(arg: &str, cache_root: &Path) -> Result<PathBuf> {
    match arg {
        "tiny" => return ensure_trained(cache_root),
        "tiny-random" => return ensure(cache_root),
        _ => {}
    }
    let p = PathBuf::from(arg);
    if !p.join("config.json").exists() {
        return Err(CoreError::File {
            path: p,
            msg: "is not a model directory (no config.json); pass a Hugging Face DeepSeek-V2 checkpoint dir, `tiny` or `tiny-random`".into(),
        });
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::Tokenizer;

    #[test]
    fn tiny_model_is_deterministic_and_loads() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        write_to(a.path()).unwrap();
        write_to(b.path()).unwrap();
        for f in ["model.safetensors", "tokenizer.json", "config.json"] {
            assert_eq!(
                std::fs::read(a.path().join(f)).unwrap(),
                std::fs::read(b.path().join(f)).unwrap(),
                "{f} differs"
            );
        }
        let cfg = crate::ModelConfig::from_model_dir(a.path()).unwrap();
        let tok = Tokenizer::from_model_dir(a.path(), cfg.bos_token_id).unwrap();
        assert!(tok.vocab_size() <= cfg.vocab_size);
        let ids = tok.encode_prompt("The router receives a request.").unwrap();
        assert_eq!(ids[0], 0, "BOS first");
        assert!(ids.len() < 12, "BPE merged nothing: {ids:?}");
        assert_eq!(tok.decode(&ids).unwrap(), "The router receives a request.");
        let dir = ensure(a.path()).unwrap();
        assert!(dir.join("model.safetensors").exists());
    }
}
