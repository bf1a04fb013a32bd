//! `dsv2 logits`: the logits of every input position, for parity checks against other stacks.

use anyhow::{Context, Result, bail};
use clap::{Args as ClapArgs, ValueEnum};
use dsv2_core::backend::AttnMode;
use dsv2_core::model::position_logits;
use safetensors::tensor::TensorView;

use dsv2_core::backend::Backend;

use crate::common::{load_with, parse_ids};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Attn {
    Auto,
    Naive,
    Absorbed,
}

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Model directory (Hugging Face layout) or `tiny`.
    #[arg(long, default_value = "tiny")]
    model_dir: String,
    /// Serve the random weights of the model dir's config.json drawn from this seed (as
    /// `dsv2 init-random --seed SEED` writes them) instead of reading weight files.
    #[arg(long, value_name = "SEED")]
    random_weights: Option<u64>,
    /// Input as comma-separated token ids.
    #[arg(long, conflicts_with = "text", required_unless_present = "text")]
    token_ids: Option<String>,
    /// Input text (BOS added as the tokenizer config says).
    #[arg(long)]
    text: Option<String>,
    /// Prefill the first K tokens, then feed the rest one at a time through the KV cache.
    #[arg(long)]
    decode_from: Option<usize>,
    /// Output file: tensor `logits`, f32, [num_tokens, vocab_size].
    #[arg(long)]
    out: std::path::PathBuf,
    /// Attention algorithm over the latent cache.
    #[arg(long, value_enum, default_value = "auto")]
    attn: Attn,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// How the KV cache holds the latent, bf16 or fp8 (e4m3 with a per-token scale; GPU only):
    /// compare the logits of the two on a GPU.
    #[arg(long, default_value = "bf16", env = "DSV2_KV_CACHE_DTYPE")]
    kv_cache_dtype: dsv2_core::backend::KvCacheDtype,
}

pub fn run(a: Args) -> Result<()> {
    crate::on_device!(a.device, a.kv_cache_dtype, |backend| run_on(&a, backend))
}

fn run_on<B: Backend>(a: &Args, backend: std::sync::Arc<B>) -> Result<()> {
    let loaded = load_with(&a.model_dir, backend, a.random_weights)?;
    let ids = match (&a.token_ids, &a.text) {
        (Some(ids), _) => parse_ids(ids, "--token-ids")?,
        (None, Some(t)) => match &loaded.tokenizer {
            Some(tok) => tok.encode_prompt(t)?,
            None => bail!(
                "{} has no tokenizer.json: pass --token-ids",
                loaded.dir.display()
            ),
        },
        (None, None) => bail!("give the input with --token-ids or --text"),
    };
    if ids.is_empty() {
        bail!("--token-ids: no tokens given");
    }
    if let Some(k) = a.decode_from
        && (k == 0 || k > ids.len())
    {
        bail!(
            "--decode-from {k}: must be between 1 and the number of tokens ({})",
            ids.len()
        );
    }
    let mode = match a.attn {
        Attn::Auto => AttnMode::Auto,
        Attn::Naive => AttnMode::Naive,
        Attn::Absorbed => AttnMode::Absorbed,
    };
    let logits = position_logits(&loaded.model, &*loaded.experts, &ids, a.decode_from, mode)?;
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView::new(
        safetensors::Dtype::F32,
        vec![ids.len(), loaded.model.cfg.vocab_size],
        &bytes,
    )?;
    safetensors::serialize_to_file(vec![("logits".to_string(), view)], None, &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "wrote logits [{}, {}] to {}",
        ids.len(),
        loaded.model.cfg.vocab_size,
        a.out.display()
    );
    Ok(())
}
