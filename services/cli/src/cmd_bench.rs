//! `dsv2 bench`: in-process greedy decode throughput, printed as one JSON line in the same
//! shape as bench/hf_cpu_decode.py so the two can be compared side by side.

use std::time::Instant;

use anyhow::Result;
use clap::Args as ClapArgs;
use dsv2_core::engine::{Engine, EngineConfig, GenerateParams, SeqRequest};

use dsv2_core::backend::Backend;

use crate::common::{load_with, parse_ids};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Model directory or `tiny`.
    #[arg(long, default_value = "tiny")]
    model_dir: String,
    /// Serve the random weights of the model dir's config.json drawn from this seed (as
    /// `dsv2 init-random --seed SEED` writes them) instead of reading weight files.
    #[arg(long, value_name = "SEED")]
    random_weights: Option<u64>,
    /// Prompt token ids.
    #[arg(long, default_value = "138,158,33,333,438,211,210")]
    prompt_ids: String,
    /// Tokens generated per run (decode steps timed).
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Timed runs (a warm-up run is not counted); the median is reported, like the HF script.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Sequences decoded together (same prompt); tokens/s counts all of them.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

pub fn run(a: Args) -> Result<()> {
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build_global();
    crate::on_device!(a.device, |backend| run_on(&a, backend))
}

fn run_on<B: Backend>(a: &Args, backend: std::sync::Arc<B>) -> Result<()> {
    let loaded = load_with(&a.model_dir, backend, a.random_weights)?;
    let prompt = parse_ids(&a.prompt_ids, "--prompt-ids")?;
    let params = GenerateParams {
        max_new_tokens: a.new_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    let batch = a.batch.max(1);
    let cfg = EngineConfig {
        num_blocks: batch * (prompt.len() + a.new_tokens).div_ceil(16),
        max_running: batch,
        // The whole batch prefills in one step, so only decode steps are timed.
        max_batch_tokens: (batch * prompt.len()).max(512),
        block_size: 16,
        ..Default::default()
    };
    let mut rates = Vec::new();
    let mut output_ids = Vec::new();
    for run in 0..=a.runs {
        let mut engine = Engine::new(
            loaded.model.clone(),
            loaded.experts.clone(),
            None,
            cfg.clone(),
        )?;
        // Prefill separately so only decode steps are timed.
        for id in 0..batch as u64 {
            engine.submit(SeqRequest {
                id,
                prompt: prompt.clone(),
                params: params.clone(),
            })?;
        }
        output_ids.clear();
        let mut collect = |events: Vec<dsv2_core::engine::EngineEvent>| {
            for ev in events {
                if let dsv2_core::engine::EngineEvent::Token { id: 0, token, .. } = ev {
                    output_ids.push(token);
                }
            }
        };
        collect(engine.step());
        let t0 = Instant::now();
        while engine.has_work() {
            collect(engine.step());
        }
        let secs = t0.elapsed().as_secs_f64();
        if run > 0 {
            rates.push((batch * (a.new_tokens - 1)) as f64 / secs);
        }
    }
    let best = rates.iter().copied().fold(0f64, f64::max);
    let median = {
        let mut r = rates.clone();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    };
    println!(
        "{}",
        serde_json::json!({
            "impl": "dsv2", "tokens_per_s": median, "best_tokens_per_s": best, "output_ids": output_ids,
            "new_tokens": a.new_tokens, "batch": batch, "device": a.device, "threads": a.threads, "runs": a.runs
        })
    );
    Ok(())
}
