//! What every subcommand shares: model dir resolution (incl. the embedded tiny model), loading
//! with a progress line, logging setup, and parsing of id lists.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use dsv2_core::backend::Backend;
use dsv2_core::model::{LocalExperts, Model};
use dsv2_core::tokenizer::Tokenizer;

/// `tiny` or a path → a model dir on disk.
pub fn model_dir(arg: &str) -> Result<PathBuf> {
    Ok(dsv2_server::resolve_model_dir(arg)?)
}

pub struct Loaded<B: Backend> {
    pub model: Arc<Model<B>>,
    pub experts: Arc<LocalExperts<B>>,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub dir: PathBuf,
}

/// Runs `$body` with `$backend` bound to the backend `$device` names (an `Arc<B>`), so one
/// generic function serves every device. With a `KvCacheDtype`, the caches the backend makes
/// hold that dtype (the CPU backend refuses FP8 with the reason).
#[macro_export]
macro_rules! on_device {
    ($device:expr, |$backend:ident| $body:expr) => {
        $crate::on_device!(
            $device,
            dsv2_core::backend::KvCacheDtype::Bf16,
            |$backend| $body
        )
    };
    ($device:expr, $kv:expr, |$backend:ident| $body:expr) => {{
        let device: dsv2_core::backend::DeviceSpec = $device
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--device: {e}"))?;
        let kv: dsv2_core::backend::KvCacheDtype = $kv;
        match device {
            dsv2_core::backend::DeviceSpec::Cpu => {
                kv.check_cpu().map_err(anyhow::Error::msg)?;
                let $backend = std::sync::Arc::new(dsv2_core::cpu::CpuBackend);
                $body
            }
            dsv2_core::backend::DeviceSpec::Cuda(n) => {
                let $backend = dsv2_cuda_backend::open(n)
                    .map_err(|e| anyhow::anyhow!("--device cuda:{n}: {e}"))?;
                $backend.set_kv_cache_dtype(kv);
                $body
            }
        }
    }};
}

/// Loads the model dir (or `tiny`) onto `backend`, all experts in-process.
/// With `random = Some(seed)`: the random weights of the dir's config.json
/// (`--random-weights`) instead of its weight files.
pub fn load_with<B: Backend>(arg: &str, backend: Arc<B>, random: Option<u64>) -> Result<Loaded<B>> {
    let dir = model_dir(arg)?;
    let t0 = Instant::now();
    match random {
        Some(seed) => eprint!(
            "loading {} with random weights (seed {seed}) on {} ... ",
            dir.display(),
            backend.name()
        ),
        None => eprint!("loading {} on {} ... ", dir.display(), backend.name()),
    }
    let (model, experts) = dsv2_core::model::load_local_with(backend, &dir, random)
        .with_context(|| format!("loading the model from {}", dir.display()))?;
    let tokenizer = if dir.join("tokenizer.json").exists() {
        Some(Arc::new(Tokenizer::from_model_dir(
            &dir,
            model.cfg.bos_token_id,
        )?))
    } else {
        None
    };
    eprintln!(
        "done in {:.2}s ({} layers, {} routed experts)",
        t0.elapsed().as_secs_f64(),
        model.cfg.num_hidden_layers,
        model.cfg.n_routed_experts
    );
    Ok(Loaded {
        model: Arc::new(model),
        experts: Arc::new(experts),
        tokenizer,
        dir,
    })
}

/// "1,2,3" → ids.
pub fn parse_ids(s: &str, flag: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<u32>().with_context(|| format!("{flag}: `{t}` is not a token id (expected comma-separated non-negative integers)")))
        .collect()
}
