//! `dsv2 convert` (HF checkpoint → converted dir, or `--verify` an existing one) and
//! `dsv2 init-random` (a random checkpoint with real dims), with an indicatif progress bar.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use dsv2_convert::{
    ConvertOptions, DtypeChoice, InitOptions, PlacementChoice, Preset, Progress, convert,
    init_random,
};
use dsv2_core::placement::PlacementKind;
use dsv2_core::weights::verify_converted;

#[derive(clap::Args)]
pub struct Args {
    /// The Hugging Face DeepSeek-V2 checkpoint dir (omit with --verify to only check OUT).
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Where the converted dir is written.
    #[arg(long)]
    output_dir: PathBuf,
    /// Number of expert shards to lay the routed experts out for.
    #[arg(long, default_value_t = 1)]
    expert_shards: usize,
    /// groups, contiguous, or a JSON file {"shards": [[expert ids], ...]} (replicas allowed).
    /// Default: groups when the routing groups divide evenly over the shards, else contiguous.
    #[arg(long)]
    placement: Option<String>,
    /// Put each expert on this many shards (chained over the placement: shard s also gets the
    /// experts of shards s+1 .. s+R-1), for a router started with the same --replicas to fail
    /// over between.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// keep (source dtypes; serving is bit-identical) or bf16.
    #[arg(long, default_value = "keep")]
    dtype: String,
    /// Keep files a previous (interrupted) run finished, if their plan and checksum match.
    #[arg(long)]
    resume: bool,
    /// Files written concurrently, each through its own read / hash / write pipeline (with the
    /// defaults, 0.82-0.91 of the disk's single-stream read bandwidth: bench/RESULTS.md).
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Hash every file of the converted dir and compare with the manifest (after converting,
    /// or alone without --model-dir).
    #[arg(long)]
    verify: bool,
    /// Largest output file in GB (a single larger tensor gets a file of its own); smaller files
    /// give the writer threads more to share.
    #[arg(long, default_value_t = 1.0)]
    max_file_gb: f64,
}

#[derive(clap::Args)]
pub struct InitArgs {
    /// deepseek-v2 or deepseek-v2-lite: the real config.json values and dims.
    #[arg(long)]
    preset: String,
    /// Number of decoder layers (the first is dense, the rest MoE, as in the real models).
    #[arg(long)]
    layers: usize,
    /// Output dir (a Hugging Face layout: config.json, model-*.safetensors, index).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Files written concurrently.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Largest weight file in GB.
    #[arg(long, default_value_t = 5.0)]
    max_file_gb: f64,
    /// Write config.json only: serve it with `--random-weights SEED` (router, expert, dsv2
    /// bench/logits/generate), which draws the same weights without files (a 60-layer
    /// DeepSeek-V2 is ~470 GB of bf16 that need not touch a disk).
    #[arg(long)]
    config_only: bool,
}

/// Draws an indicatif bar with bytes, throughput and ETA.
struct Bar(indicatif::ProgressBar);

impl Bar {
    fn new() -> Self {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(0),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        ) {
            bar.set_style(style);
        }
        Bar(bar)
    }
}

impl Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
        self.0.set_position(0);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn message(&self, msg: &str) {
        self.0.set_message(msg.to_string());
    }
}

fn gb(x: f64, flag: &str) -> Result<u64> {
    if !x.is_finite() || x <= 0.0 {
        bail!("{flag} must be positive");
    }
    Ok((x * 1e9) as u64)
}

pub fn run(a: Args) -> Result<()> {
    let t0 = Instant::now();
    if let Some(src) = &a.model_dir {
        let placement = match a.placement.as_deref() {
            None => PlacementChoice::Default,
            Some("groups") => PlacementChoice::Kind(PlacementKind::Groups),
            Some("contiguous") => PlacementChoice::Kind(PlacementKind::Contiguous),
            Some(f) => PlacementChoice::File(PathBuf::from(f)),
        };
        let dtype = match a.dtype.as_str() {
            "keep" => DtypeChoice::Keep,
            "bf16" => DtypeChoice::Bf16,
            other => bail!("--dtype {other}: expected keep or bf16"),
        };
        let opts = ConvertOptions {
            model_dir: src.clone(),
            output_dir: a.output_dir.clone(),
            expert_shards: a.expert_shards,
            placement,
            replicas: a.replicas,
            dtype,
            resume: a.resume,
            threads: a.threads,
            max_file_bytes: gb(a.max_file_gb, "--max-file-gb")?,
        };
        let bar = Bar::new();
        let rep = convert(&opts, &bar).with_context(|| {
            format!(
                "converting {} into {} (no manifest was written)",
                src.display(),
                a.output_dir.display()
            )
        })?;
        bar.0.finish_and_clear();
        let secs = t0.elapsed().as_secs_f64();
        eprintln!(
            "converted {} -> {}: {} files written, {} kept, {:.2} GB in {secs:.1}s ({:.0} MB/s); shards: {:?}",
            src.display(),
            a.output_dir.display(),
            rep.files_written,
            rep.files_kept,
            rep.bytes_written as f64 / 1e9,
            rep.bytes_written as f64 / 1e6 / secs.max(1e-9),
            rep.placement.iter().map(|s| s.len()).collect::<Vec<_>>()
        );
    } else if !a.verify {
        bail!("--model-dir is required (or pass --verify to check an existing converted dir)");
    }
    if a.verify {
        let bar = Bar::new();
        bar.message("verifying checksums");
        let total: u64 = dsv2_core::weights::Manifest::read(&a.output_dir)?
            .files
            .values()
            .map(|f| f.size)
            .sum();
        bar.start(total);
        verify_converted(&a.output_dir, &|n| bar.advance(n))?;
        bar.0.finish_and_clear();
        eprintln!(
            "{}: every file matches its manifest checksum",
            a.output_dir.display()
        );
    }
    Ok(())
}

pub fn run_init(a: InitArgs) -> Result<()> {
    let preset = match a.preset.as_str() {
        "deepseek-v2" => Preset::DeepseekV2,
        "deepseek-v2-lite" => Preset::DeepseekV2Lite,
        other => bail!("--preset {other}: expected deepseek-v2 or deepseek-v2-lite"),
    };
    if a.layers == 0 {
        bail!("--layers must be at least 1");
    }
    if a.config_only {
        std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
        let path = a.out.join("config.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&preset.config_json(a.layers))?,
        )
        .with_context(|| format!("writing {}", path.display()))?;
        eprintln!(
            "wrote {}: serve it with --random-weights {} (the weights `init-random --seed {}` would write, drawn where they are used)",
            path.display(),
            a.seed,
            a.seed
        );
        return Ok(());
    }
    let t0 = Instant::now();
    let bar = Bar::new();
    bar.message("writing random weights");
    let rep = init_random(
        &InitOptions {
            config: preset.config_json(a.layers),
            out: a.out.clone(),
            seed: a.seed,
            threads: a.threads,
            max_file_bytes: gb(a.max_file_gb, "--max-file-gb")?,
        },
        &bar,
    )
    .with_context(|| format!("writing a random checkpoint into {}", a.out.display()))?;
    bar.0.finish_and_clear();
    eprintln!(
        "wrote {} ({} files, {:.2} GB) in {:.1}s; no tokenizer (the real vocabulary is DeepSeek's 102400-token tokenizer: pass token ids)",
        a.out.display(),
        rep.files.len(),
        rep.total_bytes as f64 / 1e9,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
