//! `dsv2 mmlu`: MMLU accuracy of a running router per subject, subcategory and category, printed
//! like TensorRT-LLM's examples/mmlu.py (hendrycks' evaluation).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use dsv2_eval::mmlu::{self, MmluConfig};

/// Shown by `--help`: the exact procedure.
const MMLU_HELP: &str = "\
Reads the hendrycks layout (DIR/dev/<subject>_dev.csv, DIR/test/<subject>_test.csv; no header;\n\
question, A, B, C, D, answer). Prompt: \"The following are multiple choice questions (with\n\
answers) about <subject>.\\n\\n\", --ntrain dev examples \"Q\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: X\\n\\n\",\n\
then the test question ending \"Answer:\" (fewer examples when it would not fit the context).\n\
The prediction is the choice whose continuation \" A\", \" B\", \" C\" or \" D\" gets the highest\n\
log-probability (the router's prompt_logprobs, one request per candidate; each skips the logprobs\n\
of the tokens before the candidate, so the router may take them from its prefix cache: the\n\
share it took and the run's time are printed on stderr and kept in --report).\n\
\n\
The copy in ../shared/data/mmlu builds its dev/ split from the first five TEST questions of\n\
each subject (its README says so): accuracy on it is close to, not equal to, published MMLU.\n\
";

#[derive(ClapArgs, Debug)]
#[command(after_help = MMLU_HELP)]
pub struct Args {
    /// Router URL, e.g. http://127.0.0.1:50051 (what `dsv2 up` prints; https:// for TLS).
    #[arg(long)]
    endpoint: String,
    #[command(flatten)]
    security: dsv2_security::args::ClientArgs,
    /// MMLU directory in the hendrycks layout (dev/ and test/).
    #[arg(long)]
    data_dir: PathBuf,
    /// Few-shot examples per prompt.
    #[arg(long, default_value_t = 5)]
    ntrain: usize,
    /// Only these subjects (comma separated, e.g. anatomy,astronomy). Default: all in test/.
    #[arg(long, value_delimiter = ',')]
    subjects: Option<Vec<String>>,
    /// Questions in flight (each sends its four candidate requests at once).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Use only the first N test questions of each subject.
    #[arg(long)]
    max_questions_per_subject: Option<usize>,
    /// Write accuracies and every question's log-probabilities to this JSON file.
    #[arg(long)]
    report: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let subjects = mmlu::load(
        &a.data_dir,
        a.subjects.as_deref(),
        a.ntrain,
        a.max_questions_per_subject,
    )?;
    let note = mmlu::dev_split_note(&a.data_dir);
    if let Some(n) = &note {
        eprintln!("{n}");
    }
    let total: usize = subjects.iter().map(|s| s.test.len()).sum();
    let bar = crate::cmd_summarize::progress_bar(total as u64, "questions");
    let b = bar.clone();
    let progress: dsv2_eval::Progress = Arc::new(move |n| b.inc(n));
    let cfg = MmluConfig {
        ntrain: a.ntrain,
        concurrency: a.concurrency,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let t0 = std::time::Instant::now();
    let results = rt.block_on(async {
        let client = dsv2_eval::Client::connect(&a.endpoint, &a.security).await?;
        mmlu::run(&client, &subjects, &cfg, progress).await
    });
    let seconds = t0.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let results = results?;
    let sent: usize = results.iter().map(|r| r.sent_prompt_tokens).sum();
    let cached: usize = results.iter().map(|r| r.cached_prompt_tokens).sum();
    let hit_rate = cached as f64 / sent.max(1) as f64;
    let order: Vec<String> = subjects.iter().map(|s| s.name.clone()).collect();
    let summary = mmlu::summarize(&results, &order);
    print!("{}", mmlu::format_summary(&summary));
    let fewer = results.iter().filter(|r| r.shots < a.ntrain).count();
    if fewer > 0 {
        eprintln!(
            "note: {fewer} questions used fewer than {} examples to fit the context",
            a.ntrain
        );
    }
    if let Some(n) = &note {
        println!("{n}");
    }
    // stderr: stdout stays the seed's printout.
    eprintln!(
        "{} questions in {seconds:.1} s; prefix cache: {cached} of {sent} prompt tokens sent were cached ({:.1}%)",
        results.len(),
        hit_rate * 100.0
    );
    if let Some(path) = &a.report {
        let report = serde_json::json!({
            "data_dir": a.data_dir,
            "ntrain": a.ntrain,
            "data_note": note,
            "summary": summary,
            "seconds": seconds,
            "prompt_tokens_sent": sent,
            "prompt_tokens_cached": cached,
            "prefix_cache_hit_rate": hit_rate,
            "questions": results,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
