//! What every subcommand shares: model dir resolution (incl. the embedded tiny model), loading
//! with a progress line, logging setup, and parsing of id lists.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use dsv2_core::cpu::CpuBackend;
use dsv2_core::model::{LocalExperts, Model, load_local};
use dsv2_core::tiny;
use dsv2_core::tokenizer::Tokenizer;

pub fn init_logging(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// `tiny` or a path → a model dir on disk.
pub fn model_dir(arg: &str) -> Result<PathBuf> {
    let root = tiny::cache_root(
        std::env::var("DSV2_CACHE_DIR").ok(),
        std::env::var("XDG_CACHE_HOME").ok(),
        std::env::var("HOME").ok(),
    );
    Ok(tiny::resolve_model_dir(arg, &root)?)
}

pub struct Loaded {
    pub model: Arc<Model<CpuBackend>>,
    pub experts: Arc<LocalExperts<CpuBackend>>,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub dir: PathBuf,
}

pub fn load_cpu(arg: &str, device: &str) -> Result<Loaded> {
    if device != "cpu" {
        bail!(
            "--device {device}: this build runs on the CPU only; GPU serving needs the CUDA backend (use --device cpu)"
        );
    }
    let dir = model_dir(arg)?;
    let t0 = Instant::now();
    eprint!("loading {} ... ", dir.display());
    let (model, experts) = load_local(Arc::new(CpuBackend), &dir)
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
