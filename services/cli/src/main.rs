//! `dsv2`: the command-line front end — generate, score logits, run a local cluster, evaluate.

mod cmd_bench;
mod cmd_convert;
mod cmd_generate;
mod cmd_loadtest;
mod cmd_logits;
mod cmd_mmlu;
mod cmd_rouge;
mod cmd_summarize;
mod cmd_up;
mod common;
mod remote;

use clap::{Parser, Subcommand};

/// Multi-MB message and activation buffers come and go every MoE layer: glibc hands them back
/// to the kernel and faults them in again (half the loopback round trip at 256 rows,
/// bench/RESULTS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "dsv2",
    version,
    about = "DeepSeek-V2 serving toolkit: generate, score, serve, evaluate"
)]
struct Cli {
    /// Log level filter (RUST_LOG syntax), e.g. info or dsv2=debug.
    #[arg(long, global = true, env = "DSV2_LOG", default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt, in-process (CPU) or against a running router (--endpoint).
    Generate(cmd_generate::Args),
    /// Write the logits of every input position to a safetensors file.
    Logits(cmd_logits::Args),
    /// ROUGE-1/2/L/Lsum of predictions against references (rouge-score compatible).
    Rouge(cmd_rouge::Args),
    /// Start a local cluster (router + expert shards) on loopback; --prompt answers one request.
    Up(cmd_up::Args),
    /// Load-test a running router like ghz does (summary, latency distribution, tokens/s).
    Loadtest(cmd_loadtest::Args),
    /// Measure batched decode and prefill of distinct prompts against this device's roofline.
    #[command(long_about = cmd_bench::LONG_ABOUT)]
    Bench(cmd_bench::Args),
    /// Convert a Hugging Face checkpoint into router + per-shard files with a manifest.
    Convert(cmd_convert::Args),
    /// Write a random checkpoint with real DeepSeek-V2 / V2-Lite dims (HF layout, streamed).
    InitRandom(cmd_convert::InitArgs),
    /// Summarize articles through a router: latency, tokens/s, ROUGE (summarize.py's procedure).
    Summarize(cmd_summarize::Args),
    /// MMLU accuracy of a router per subject and category (hendrycks / mmlu.py).
    Mmlu(cmd_mmlu::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    dsv2_server::init_logging(&cli.log_level, dsv2_server::LogFormat::Human, "warn");
    let result = match cli.cmd {
        Cmd::Generate(a) => cmd_generate::run(a),
        Cmd::Logits(a) => cmd_logits::run(a),
        Cmd::Rouge(a) => cmd_rouge::run(a),
        Cmd::Bench(a) => cmd_bench::run(a),
        Cmd::Convert(a) => cmd_convert::run(a),
        Cmd::InitRandom(a) => cmd_convert::run_init(a),
        Cmd::Up(a) => cmd_up::run(a),
        Cmd::Loadtest(a) => cmd_loadtest::run(a),
        Cmd::Summarize(a) => cmd_summarize::run(a),
        Cmd::Mmlu(a) => cmd_mmlu::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
