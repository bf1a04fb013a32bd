//! `dsv2 summarize`: CNN/DailyMail-style summarization through a running router — total latency,
//! output tokens, tokens/s and ROUGE, printed like TensorRT-LLM's examples/summarize.py, with an
//! optional second system (`--hf-outputs`) scored beside ours.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use dsv2_eval::dataset::load_samples;
use dsv2_eval::summarize::{
    self, DEFAULT_MAX_INPUT_LEN, SummarizeConfig, format_block, format_comparison,
    load_other_outputs, score_other,
};

/// Shown by `--help`: the exact procedure.
const SUMMARIZE_HELP: &str = "\
Prompt per article, as summarize.py builds it:\n\
`(article + \" TL;DR: \").strip().replace(\" n't\", \"n't\")`, tokenized with the BOS token and cut\n\
to its first --max-input-len tokens (summarize.py's --max_input_length, 923). Decoding is\n\
greedy. ROUGE is the mean over samples of the per-sample F-measure, x100 (rouge-score's\n\
tokenizer; no stemming unless --stemmer, as evaluate's \"rouge\" defaults).\n\
";

#[derive(ClapArgs, Debug)]
#[command(after_help = SUMMARIZE_HELP)]
pub struct Args {
    /// Router URL, e.g. http://127.0.0.1:50051 (what `dsv2 up` prints; https:// for TLS).
    #[arg(long)]
    endpoint: String,
    #[command(flatten)]
    security: dsv2_security::args::ClientArgs,
    /// Dataset with `article` and `highlights` columns: .parquet, .jsonl or .csv (with a header).
    #[arg(long)]
    dataset: PathBuf,
    /// Use only the first N samples (file order).
    #[arg(long)]
    max_samples: Option<usize>,
    /// Requests in flight.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Tokens generated per article (summarize.py --output_len).
    #[arg(long, default_value_t = 100)]
    max_output_len: u32,
    /// Prompt tokens kept, from the start (BOS included).
    #[arg(long, default_value_t = DEFAULT_MAX_INPUT_LEN)]
    max_input_len: usize,
    /// Porter stemming in ROUGE.
    #[arg(long)]
    stemmer: bool,
    /// Outputs of another system for the same first N samples (JSON Lines: {"index", "output",
    /// optional "output_tokens", "latency_s"}; bench/hf_summarize.py writes it): printed beside ours.
    #[arg(long)]
    hf_outputs: Option<PathBuf>,
    /// Name of the --hf-outputs system in the printout.
    #[arg(long, default_value = "Hugging Face")]
    hf_name: String,
    /// Write every number and every output to this JSON file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Print each sample's input, reference and output.
    #[arg(long)]
    print_samples: bool,
}

pub fn run(a: Args) -> Result<()> {
    let samples = load_samples(&a.dataset, a.max_samples)?;
    // Read the other system's file before the (long) run, so a bad file fails fast.
    let other = a
        .hf_outputs
        .as_deref()
        .map(|p| load_other_outputs(p, samples.len()))
        .transpose()?;
    let cfg = SummarizeConfig {
        max_output_len: a.max_output_len,
        max_input_len: a.max_input_len,
        concurrency: a.concurrency,
        use_stemmer: a.stemmer,
    };
    let bar = progress_bar(samples.len() as u64, "samples");
    let b = bar.clone();
    let progress: dsv2_eval::Progress = Arc::new(move |n| b.inc(n));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let run = rt.block_on(async {
        let client = dsv2_eval::Client::connect(&a.endpoint, &a.security).await?;
        summarize::run(&client, &samples, &cfg, progress).await
    });
    bar.finish_and_clear();
    let run = run?;
    if a.print_samples {
        for (s, r) in samples.iter().zip(&run.samples) {
            println!("---------------------------------------------------------");
            println!("[{}] (line {} of {})", r.index, s.line, a.dataset.display());
            println!(" Input: {}", s.article);
            println!("\n Reference: {}", s.highlights);
            println!("\n Output: {}", r.output);
        }
        println!("---------------------------------------------------------");
    }
    let truncated = run.samples.iter().filter(|r| r.truncated).count();
    if truncated > 0 {
        eprintln!(
            "note: {truncated} of {} prompts were cut to their first {} tokens (as summarize.py does)",
            run.samples.len(),
            a.max_input_len
        );
    }
    print!(
        "{}",
        format_block(
            "dsv2",
            Some(run.total_latency_s),
            Some(run.total_output_tokens),
            &run.rouge
        )
    );
    let other = other.map(|o| score_other(&a.hf_name, &o, &samples, a.stemmer));
    if let Some(o) = &other {
        print!(
            "{}",
            format_block(&o.name, o.total_latency_s, o.total_output_tokens, &o.rouge)
        );
        print!(
            "{}",
            format_comparison("dsv2", &run.rouge, &o.name, &o.rouge)
        );
    }
    if let Some(path) = &a.report {
        let report = serde_json::json!({
            "dataset": a.dataset,
            "samples": samples.len(),
            "max_output_len": a.max_output_len,
            "max_input_len": a.max_input_len,
            "concurrency": a.concurrency,
            "stemmer": a.stemmer,
            "prompt_template": "(article + \" TL;DR: \").strip().replace(\" n't\", \"n't\")",
            "dsv2": run,
            "other": other,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A progress bar on stderr: items done, rate and ETA (shared with `dsv2 mmlu`).
pub fn progress_bar(total: u64, unit: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    let template = format!(
        "{{bar:40}} {{pos}}/{{len}} {unit} [{{elapsed_precise}}, {{per_sec}}, ETA {{eta}}]"
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}
