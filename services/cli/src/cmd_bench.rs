//! `dsv2 bench`: in-process batched decode and prefill of distinct prompts, each configuration
//! beside the roofline of this device (copy bandwidth and GEMM rate measured in the same process).

mod cost;
mod host_restore;
mod measure;
mod probe;
mod prompts;
mod report;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args as ClapArgs;
use dsv2_core::backend::{Backend, KvCacheDtype};
use dsv2_core::weights::WeightStore;
use indicatif::{ProgressBar, ProgressStyle};

use crate::common::load_with;
use cost::ModelCost;
use probe::RoutingProbe;
use prompts::Prompts;
use report::{Config, Report};

/// Prefill steps of the warm-up before each batch size's first configuration.
const WARMUP_PROMPT_TOKENS: usize = 16;
const WARMUP_DECODE_STEPS: usize = 2;

/// `dsv2 bench --help`: what is measured and how.
pub const LONG_ABOUT: &str = "Measure batched decode and prefill in-process, each beside this device's roofline.\n\n\
For every batch size x context: prefill BATCH distinct prompts of CONTEXT tokens (seeded random \
ids by default), then time NEW_TOKENS - 1 greedy decode steps of the whole batch. Each step is \
Model::forward_logits + the greedy argmax (the engine's scheduling and text handling are not \
in it; `dsv2 loadtest` against a router measures the served path).\n\n\
Per decode step it prints tok/s, step ms, the distinct experts each MoE layer touches (mean \
over layers and steps), the bytes that must move (dense weights once, each touched expert once, \
the latent KV cache read), the FLOPs, the roofline max(bytes / copy bandwidth, FLOPs / GEMM \
rate) and measured / roofline; for the prefill: prompt tok/s and time to first token against \
the compute floor (FLOPs / GEMM rate). Both ceilings are measured in this process before the \
run: on cuda a 1 GiB device-to-device copy and a cuBLAS bf16 8192^3 GEMM, on cpu a 256 MiB \
memcpy and a 1024^3 GEMM through the backend's matmul, over its threads.\n\n\
Copies of one prompt (all rows route to the same experts, which hides the MoE cost) only with \
--same-prompt, and the output says so.\n\n\
With --host-restore LENS it measures the prefix cache's host tier instead: per prefix length, \
the prefill of the prefix against copying its cache blocks to host memory and back (what a hit \
in the host tier costs instead), and checks that the restored blocks give the same logits.\n\n\
Examples: `dsv2 bench --batch 1,8 --context 64,256` (the tiny model on the CPU); \
`dsv2 bench --device cuda:0 --model-dir DIR --random-weights 1 --json bench.json` (the \
defaults: batch 1, 8, 64, 256 x context 512, 4096).";

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Model directory or `tiny`.
    #[arg(long, default_value = "tiny")]
    model_dir: String,
    /// Serve the random weights of the model dir's config.json drawn from this seed (as
    /// `dsv2 init-random --seed SEED` writes them) instead of reading weight files.
    #[arg(long, value_name = "SEED")]
    random_weights: Option<u64>,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// How the KV cache holds the latent: bf16, or fp8 (e4m3 with a per-token scale, the RoPE
    /// key in bf16: 656 bytes a token and layer instead of 1,152 at DeepSeek-V2's dims; GPU only).
    #[arg(long, default_value = "bf16", env = "DSV2_KV_CACHE_DTYPE")]
    kv_cache_dtype: KvCacheDtype,
    /// Worker threads (the CPU backend's matmuls and its ceilings).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Batch sizes (sequences decoded together), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,256")]
    batch: Vec<usize>,
    /// Prompt lengths in tokens, comma-separated: each sequence is prefilled to this length
    /// and the decode steps are timed with this many tokens in its KV cache. Not with --prompts.
    #[arg(
        long,
        visible_alias = "prompt-len",
        value_delimiter = ',',
        default_value = "512,4096",
        conflicts_with = "prompts"
    )]
    context: Vec<usize>,
    /// Tokens generated per sequence: the prefill gives the first, the other NEW_TOKENS - 1
    /// are the timed decode steps.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Timed runs of each configuration (fresh cache each); decode steps of all runs are pooled
    /// for the median, the prefill takes the median run.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Seed of the random prompts: sequence i's ids are a SplitMix64 stream of (seed, i), the
    /// same as bench/prompts.py draws for the HF comparison.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Prompts from a text file, one per line, tokenized with the model's tokenizer; each keeps
    /// its own length (instead of --context), lines are reused in turn when a batch is larger.
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    /// Give every sequence of a batch the SAME prompt (sequence 0's). Hides the MoE cost: all
    /// rows route to the same experts. Only for comparing with old one-prompt numbers.
    #[arg(long)]
    same_prompt: bool,
    /// Write the prompt ids used (largest batch, longest context; one sequence per line) to
    /// FILE, for bench/hf_cpu_decode.py --prompt-file.
    #[arg(long, value_name = "FILE")]
    dump_prompts: Option<PathBuf>,
    /// Write every number as JSON to FILE (`-`: to stdout, the table then goes to stderr).
    #[arg(long, value_name = "FILE")]
    json: Option<String>,
    /// Token budget of one prefill step: prompts are packed, and a longer one is cut into
    /// chunks, to fit (the router's --max-batch-tokens plays this part when serving).
    #[arg(long, default_value_t = 8192)]
    prefill_tokens: usize,
    /// Tokens per KV cache block (the router's --block-size). The TMA decode kernels copy
    /// min(block, 64) cache rows a piece, so 64 is what they are built for; 16 is the router's
    /// default.
    #[arg(
        long,
        default_value_t = 16,
        value_parser = clap::value_parser!(u32).range(1..=1024),
        conflicts_with = "host_restore"
    )]
    block_size: u32,
    /// Untimed decode steps with routing on the host, after the timed ones, when the backend
    /// routed the timed steps where they could not be counted (the CUDA backend keeps the
    /// expert ids on the device).
    #[arg(long, default_value_t = 4)]
    probe_steps: usize,
    /// Instead of the decode/prefill bench, time the prefix cache's host tier for these prefix
    /// lengths (tokens, comma-separated, cut to whole blocks of 16): the prefill of the prefix
    /// (the recompute a host-tier hit saves), the copy of its blocks to host memory and the copy
    /// back into other blocks, all in one batch as the engine issues them; then checks that a
    /// decode step over the restored blocks gives the same logits. Takes --runs (median),
    /// --prefill-tokens, --seed, --json.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "TOKENS",
        conflicts_with = "prompts"
    )]
    host_restore: Option<Vec<usize>>,
    /// Small ceilings measurement (tests only: not a real ceiling).
    #[arg(long, hide = true)]
    quick_ceilings: bool,
}

pub fn run(a: Args) -> Result<()> {
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build_global();
    if a.batch.is_empty() || a.batch.contains(&0) {
        bail!("--batch: every batch size must be at least 1");
    }
    if a.context.is_empty() || a.context.contains(&0) {
        bail!("--context: every context must be at least 1 token");
    }
    if a.new_tokens < 2 {
        bail!("--new-tokens must be at least 2 (the first token comes from the prefill)");
    }
    if a.runs == 0 || a.prefill_tokens == 0 {
        bail!("--runs and --prefill-tokens must be at least 1");
    }
    if let Some(lens) = &a.host_restore {
        if lens.is_empty() {
            bail!("--host-restore: give at least one prefix length");
        }
        return crate::on_device!(a.device, a.kv_cache_dtype, |backend| host_restore_on(
            &a, lens, backend
        ));
    }
    crate::on_device!(a.device, a.kv_cache_dtype, |backend| run_on(&a, backend))
}

fn host_restore_on<B: Backend>(a: &Args, lens: &[usize], backend: Arc<B>) -> Result<()> {
    let loaded = load_with(&a.model_dir, backend.clone(), a.random_weights)?;
    let cfg = &loaded.model.cfg;
    let mut special: Vec<u32> = cfg.eos_token_ids.clone();
    special.extend(cfg.bos_token_id);
    let plan = host_restore::Plan {
        lens,
        runs: a.runs,
        prefill_tokens: a.prefill_tokens,
        seed: a.seed,
        special: &special,
    };
    let rows = host_restore::run(&loaded.model, &*loaded.experts, &plan)?;
    let prefix = 256.min(cfg.max_position_embeddings / 2);
    let check = host_restore::engine_check(
        &loaded.model,
        loaded.experts.clone(),
        prefix,
        a.seed,
        &special,
    )?;
    let table = host_restore::table(&backend.name(), &rows) + &check.line();
    let json = serde_json::json!({
        "backend": backend.name(),
        "device": a.device,
        "kv_cache_dtype": a.kv_cache_dtype.to_string(),
        "model_dir": loaded.dir.display().to_string(),
        "random_weights": a.random_weights,
        "layers": cfg.num_hidden_layers,
        "runs": a.runs,
        "prefill_tokens": a.prefill_tokens,
        "host_restore": rows.iter().map(host_restore::Row::json).collect::<Vec<_>>(),
        "engine_check": check.json(),
    });
    match a.json.as_deref() {
        Some("-") => {
            eprint!("{table}");
            println!("{json}");
        }
        Some(path) => {
            print!("{table}");
            std::fs::write(path, format!("{json:#}\n"))
                .with_context(|| format!("--json: cannot write {path}"))?;
        }
        None => print!("{table}"),
    }
    Ok(())
}

fn run_on<B: Backend>(a: &Args, backend: Arc<B>) -> Result<()> {
    eprint!("measuring the ceilings of {} ... ", backend.name());
    let ceilings = backend
        .measure_ceilings(a.quick_ceilings)
        .context("measuring the ceilings")?;
    eprintln!(
        "copy {}B/s, GEMM {}FLOP/s",
        report::si(ceilings.copy_bytes_per_s),
        report::si(ceilings.gemm_flops_per_s)
    );
    let loaded = load_with(&a.model_dir, backend.clone(), a.random_weights)?;
    let cfg = loaded.model.cfg.clone();
    // Bytes per weight element: the backend's own format, or (CPU) each tensor's stored dtype.
    let store = match ceilings.weight_elem_bytes {
        Some(_) => None,
        None => Some(WeightStore::open_or_random(
            &loaded.dir,
            a.random_weights,
            |_| true,
        )?),
    };
    let cost = ModelCost::new(
        &cfg,
        |name| match (ceilings.weight_elem_bytes, &store) {
            (Some(b), _) => b,
            (None, Some(s)) => s.tensor(name).map_or(2, |t| t.dtype.size()),
            (None, None) => 2,
        },
        // one token of every layer, as the backend holds it (bf16 or FP8 on a GPU, f32 on the
        // CPU): what its host tier copies per token
        backend.host_block_bytes(&cfg, 1) / cfg.num_hidden_layers.max(1),
    );
    let prompts = match &a.prompts {
        Some(path) => {
            let tok = loaded
                .tokenizer
                .as_ref()
                .context("--prompts: this model dir has no tokenizer.json to tokenize with")?;
            Prompts::from_file(path, tok, a.same_prompt)?
        }
        None => {
            let mut special: Vec<u32> = cfg.eos_token_ids.clone();
            special.extend(cfg.bos_token_id);
            Prompts::random(a.seed, a.same_prompt, cfg.vocab_size, special)?
        }
    };
    let contexts: Vec<Option<usize>> = match a.prompts {
        Some(_) => vec![None],
        None => a.context.iter().copied().map(Some).collect(),
    };
    let max_batch = a.batch.iter().copied().max().unwrap_or(1);
    let max_ctx = a.context.iter().copied().max().unwrap_or(1);
    if let Some(path) = &a.dump_prompts {
        prompts.dump(path, max_batch, max_ctx)?;
        eprintln!("prompt ids written to {}", path.display());
    }

    let probe = RoutingProbe::new(loaded.experts.clone(), cfg.n_routed_experts);
    let decode_steps = a.new_tokens - 1;
    let extra = decode_steps + a.probe_steps;
    let mut configs = Vec::new();
    let mut skipped = Vec::new();
    for &batch in &a.batch {
        for &ctx in &contexts {
            let seqs = prompts.batch(batch, ctx.unwrap_or(0));
            let longest = seqs.iter().map(Vec::len).max().unwrap_or(0);
            if longest + extra > cfg.max_position_embeddings {
                skipped.push(serde_json::json!({
                    "batch": batch, "context": longest,
                    "reason": format!(
                        "prompt ({longest}) + {extra} decode and probe steps exceed the model's {} positions",
                        cfg.max_position_embeddings
                    ),
                }));
                continue;
            }
            configs.push((batch, seqs));
        }
    }
    let total_ticks: u64 = configs
        .iter()
        .map(|(_, seqs)| {
            let tokens: usize = seqs.iter().map(Vec::len).sum();
            (a.runs * (tokens.div_ceil(a.prefill_tokens) + extra)) as u64
        })
        .sum();
    let bar = ProgressBar::new(total_ticks);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );

    let mut results = Vec::new();
    let mut warmed = Vec::new();
    for (batch, seqs) in &configs {
        let batch = *batch;
        let ctx = seqs.iter().map(Vec::len).sum::<usize>() / batch;
        if !warmed.contains(&batch) {
            bar.set_message(format!("batch {batch}: warm-up"));
            let short: Vec<Vec<u32>> = seqs
                .iter()
                .map(|s| s[..s.len().min(WARMUP_PROMPT_TOKENS)].to_vec())
                .collect();
            let plan = measure::Plan {
                prompts: &short,
                decode_steps: WARMUP_DECODE_STEPS,
                probe_steps: 0,
                prefill_tokens: a.prefill_tokens,
                block_size: a.block_size as usize,
            };
            measure::run(&loaded.model, &probe, &plan, || {})
                .with_context(|| format!("warm-up at batch {batch}"))?;
            warmed.push(batch);
        }
        let mut runs = Vec::with_capacity(a.runs);
        for r in 0..a.runs {
            bar.set_message(format!(
                "batch {batch}, context {ctx}: run {}/{}",
                r + 1,
                a.runs
            ));
            let before = bar.position();
            let plan = measure::Plan {
                prompts: seqs,
                decode_steps,
                probe_steps: a.probe_steps,
                prefill_tokens: a.prefill_tokens,
                block_size: a.block_size as usize,
            };
            let run = measure::run(&loaded.model, &probe, &plan, || bar.inc(1))
                .with_context(|| format!("batch {batch}, context {ctx}"))?;
            // probe steps that were not needed
            let tokens: usize = seqs.iter().map(Vec::len).sum();
            bar.set_position(before + (tokens.div_ceil(a.prefill_tokens) + extra) as u64);
            runs.push(run);
        }
        results.push(Config::new(batch, seqs, runs, &cost, &ceilings));
    }
    bar.finish_and_clear();

    let report = Report {
        backend: backend.name(),
        device: a.device.clone(),
        kv_cache_dtype: a.kv_cache_dtype.to_string(),
        threads: a.threads,
        model_dir: loaded.dir.display().to_string(),
        random_weights: a.random_weights,
        cfg: &cfg,
        cost: &cost,
        ceilings: &ceilings,
        prompts: &prompts,
        new_tokens: a.new_tokens,
        runs: a.runs,
        prefill_tokens: a.prefill_tokens,
        probe_steps: a.probe_steps,
        block_size: a.block_size as usize,
        configs: &results,
        skipped: &skipped,
    };
    let json = report.json();
    match a.json.as_deref() {
        Some("-") => {
            eprint!("{}", report.table());
            println!("{json}");
        }
        Some(path) => {
            print!("{}", report.table());
            std::fs::write(path, format!("{json:#}\n"))
                .with_context(|| format!("--json: cannot write {path}"))?;
            eprintln!("every number written to {path}");
        }
        None => print!("{}", report.table()),
    }
    Ok(())
}
