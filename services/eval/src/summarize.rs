//! Summarization evaluation the way TensorRT-LLM's examples/summarize.py does it: the prompt
//! template, concurrent greedy generation through the router, total latency / output tokens /
//! tokens per second, and ROUGE-1/2/L/Lsum (x100, F-measure, mean of per-sample scores), plus
//! the outputs of another system (`--hf-outputs`) scored the same way.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client::{Client, Progress, greedy_request};
use crate::dataset::Sample;
use crate::error::{EvalError, Result};

/// The cue summarize.py appends to every article (eval_task "summarize").
pub const SUMMARIZE_CUE: &str = " TL;DR: ";
/// summarize.py's default --max_input_length: prompts are cut to their first 923 tokens.
pub const DEFAULT_MAX_INPUT_LEN: usize = 923;

/// The prompt text of one article, exactly as summarize.py builds it:
/// `(article + " TL;DR: ").strip().replace(" n't", "n't")`. Python's `str.strip()` removes
/// Unicode whitespace at both ends, as Rust's `trim()` does.
pub fn prompt_text(article: &str) -> String {
    let mut s = String::with_capacity(article.len() + SUMMARIZE_CUE.len());
    s.push_str(article);
    s.push_str(SUMMARIZE_CUE);
    s.trim().replace(" n't", "n't")
}

#[derive(Clone, Debug)]
pub struct SummarizeConfig {
    /// Tokens to generate per article (summarize.py --output_len, default 100).
    pub max_output_len: u32,
    /// Prompt tokens kept (BOS included), from the start, like summarize.py's truncation.
    pub max_input_len: usize,
    /// Requests in flight.
    pub concurrency: usize,
    /// Porter stemming in ROUGE (summarize.py's evaluate "rouge" default: off).
    pub use_stemmer: bool,
}

/// One article's result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SampleResult {
    /// 0-based index among the evaluated samples.
    pub index: usize,
    /// Line (CSV/JSONL) or row (parquet) of the sample in the dataset file.
    pub line: u64,
    pub prompt_tokens: usize,
    /// The prompt was cut to fit max_input_len (or the context window).
    pub truncated: bool,
    pub output: String,
    pub output_tokens: u64,
    /// Seconds from sending this sample's first call (Tokenize) to its answer.
    pub latency_s: f64,
    pub finish_reason: String,
}

/// Means over samples of the per-sample F-measures, x100.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct RougeMeans {
    pub rouge1: f64,
    pub rouge2: f64,
    #[serde(rename = "rougeL")]
    pub rouge_l: f64,
    #[serde(rename = "rougeLsum")]
    pub rouge_lsum: f64,
}

/// ROUGE of predictions against references (pairwise, same length), mean F-measure x100.
pub fn rouge_means(preds: &[&str], refs: &[&str], use_stemmer: bool) -> RougeMeans {
    let opts = dsv2_rouge::RougeOptions { use_stemmer };
    let per: Vec<_> = preds
        .iter()
        .zip(refs)
        .map(|(p, r)| dsv2_rouge::score(p, r, &opts))
        .collect();
    let m = dsv2_rouge::aggregate(&per);
    RougeMeans {
        rouge1: m.rouge1.fmeasure * 100.0,
        rouge2: m.rouge2.fmeasure * 100.0,
        rouge_l: m.rouge_l.fmeasure * 100.0,
        rouge_lsum: m.rouge_lsum.fmeasure * 100.0,
    }
}

/// The whole run against the router.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SummarizeRun {
    pub model_name: String,
    /// Wall time from the first request to the last answer, seconds.
    pub total_latency_s: f64,
    pub total_output_tokens: u64,
    pub tokens_per_s: f64,
    pub rouge: RougeMeans,
    pub samples: Vec<SampleResult>,
}

/// Summarizes every sample through the router, `cfg.concurrency` samples in flight.
pub async fn run(
    client: &Client,
    samples: &[Sample],
    cfg: &SummarizeConfig,
    progress: Progress,
) -> Result<SummarizeRun> {
    if cfg.concurrency == 0 {
        return Err(EvalError::Usage("--concurrency must be at least 1".into()));
    }
    if cfg.max_output_len == 0 {
        return Err(EvalError::Usage(
            "--max-output-len must be at least 1".into(),
        ));
    }
    let info = client.model_info().await?;
    let ctx = info.max_context_tokens as usize;
    if cfg.max_output_len as usize >= ctx {
        return Err(EvalError::Usage(format!(
            "--max-output-len {} leaves no room for a prompt in the model's {ctx}-token context",
            cfg.max_output_len
        )));
    }
    // The server refuses prompt + max_new_tokens beyond the context: cut prompts to fit.
    let keep = cfg.max_input_len.min(ctx - cfg.max_output_len as usize);
    let sem = Arc::new(Semaphore::new(cfg.concurrency));
    let mut set = JoinSet::new();
    let mut results: Vec<Option<SampleResult>> = vec![None; samples.len()];
    let t0 = Instant::now();
    for (index, s) in samples.iter().enumerate() {
        // Waiting for a permit before spawning bounds the number of live tasks, not just RPCs.
        let permit = sem
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| EvalError::Protocol(e.to_string()))?;
        let (client, progress) = (client.clone(), progress.clone());
        let (text, line, max_new) = (prompt_text(&s.article), s.line, cfg.max_output_len);
        set.spawn(async move {
            let _permit = permit;
            let t = Instant::now();
            let mut ids = client.tokenize(&text, true).await?;
            let truncated = ids.len() > keep;
            ids.truncate(keep);
            let prompt_tokens = ids.len();
            let r = client.generate(greedy_request(ids, max_new)).await?;
            progress(1);
            Ok::<_, EvalError>(SampleResult {
                index,
                line,
                prompt_tokens,
                truncated,
                output: r.text,
                output_tokens: r.completion_tokens as u64,
                latency_s: t.elapsed().as_secs_f64(),
                finish_reason: finish_name(r.finish_reason).to_string(),
            })
        });
        // Collect what has finished so far: surfaces a failure early instead of after every
        // sample was sent.
        while let Some(done) = set.try_join_next() {
            let r = done.map_err(|e| EvalError::Protocol(e.to_string()))??;
            let i = r.index;
            results[i] = Some(r);
        }
    }
    while let Some(done) = set.join_next().await {
        let r = done.map_err(|e| EvalError::Protocol(e.to_string()))??;
        let i = r.index;
        results[i] = Some(r);
    }
    let total_latency_s = t0.elapsed().as_secs_f64();
    let results: Vec<SampleResult> = results.into_iter().flatten().collect();
    if results.len() != samples.len() {
        return Err(EvalError::Protocol(format!(
            "{} of {} samples came back",
            results.len(),
            samples.len()
        )));
    }
    let total_output_tokens = results.iter().map(|r| r.output_tokens).sum();
    let preds: Vec<&str> = results.iter().map(|r| r.output.as_str()).collect();
    let refs: Vec<&str> = samples.iter().map(|s| s.highlights.as_str()).collect();
    Ok(SummarizeRun {
        model_name: info.model_name,
        total_latency_s,
        total_output_tokens,
        tokens_per_s: total_output_tokens as f64 / total_latency_s,
        rouge: rouge_means(&preds, &refs, cfg.use_stemmer),
        samples: results,
    })
}

fn finish_name(code: i32) -> &'static str {
    use dsv2_proto::inference::v1::FinishReason as F;
    match F::try_from(code) {
        Ok(F::Length) => "length",
        Ok(F::Eos) => "eos",
        Ok(F::Stop) => "stop",
        Ok(F::Cancelled) => "cancelled",
        _ => "unspecified",
    }
}

/// One line of an `--hf-outputs` file (what bench/hf_summarize.py writes).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OtherOutput {
    /// 0-based index of the sample among the first N of the dataset.
    pub index: usize,
    pub output: String,
    #[serde(default)]
    pub output_tokens: Option<u64>,
    /// Seconds this sample took in the other system.
    #[serde(default)]
    pub latency_s: Option<f64>,
}

/// Reads an `--hf-outputs` JSONL file; needs exactly one line for each index `0..n`.
pub fn load_other_outputs(path: &Path, n: usize) -> Result<Vec<OtherOutput>> {
    let f = File::open(path).map_err(|e| EvalError::io(path, e))?;
    let mut slots: Vec<Option<OtherOutput>> = vec![None; n];
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let lineno = i as u64 + 1;
        let line = line.map_err(|e| EvalError::data(path, lineno, e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let o: OtherOutput = serde_json::from_str(&line).map_err(|e| {
            EvalError::data(
                path,
                lineno,
                format!("expected {{\"index\": N, \"output\": \"...\"}}: {e}"),
            )
        })?;
        if o.index >= n {
            continue; // the other system ran more samples than we did: score the common ones
        }
        let idx = o.index;
        if slots[idx].replace(o).is_some() {
            return Err(EvalError::data(
                path,
                lineno,
                format!("index {idx} appears twice"),
            ));
        }
    }
    let missing: Vec<usize> = (0..n).filter(|&i| slots[i].is_none()).collect();
    if !missing.is_empty() {
        return Err(EvalError::file(
            path,
            format!(
                "no output for {} of the {n} samples (first missing index: {})",
                missing.len(),
                missing[0]
            ),
        ));
    }
    Ok(slots.into_iter().flatten().collect())
}

/// The other system's numbers, computed like ours.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OtherRun {
    pub name: String,
    /// Sum of per-sample latencies, when the file has them for every sample.
    pub total_latency_s: Option<f64>,
    pub total_output_tokens: Option<u64>,
    pub rouge: RougeMeans,
}

pub fn score_other(
    name: &str,
    outs: &[OtherOutput],
    samples: &[Sample],
    use_stemmer: bool,
) -> OtherRun {
    let preds: Vec<&str> = outs.iter().map(|o| o.output.as_str()).collect();
    let refs: Vec<&str> = samples.iter().map(|s| s.highlights.as_str()).collect();
    OtherRun {
        name: name.to_string(),
        total_latency_s: outs.iter().map(|o| o.latency_s).sum(),
        total_output_tokens: outs.iter().map(|o| o.output_tokens).sum(),
        rouge: rouge_means(&preds, &refs, use_stemmer),
    }
}

/// A float as Python's `str(float)` writes it for the values we print: shortest round-trip
/// digits, with ".0" on whole numbers (Rust's Display leaves it off).
pub fn py_float(x: f64) -> String {
    let s = format!("{x}");
    if x.is_finite() && !s.contains(['.', 'e']) {
        s + ".0"
    } else {
        s
    }
}

/// The seed's result block: latency, tokens, tokens/s, then `beam 0 result` and the four
/// scores. Floats print in shortest round-trip form, like Python's `f"{x}"`.
pub fn format_block(
    label: &str,
    latency_s: Option<f64>,
    output_tokens: Option<u64>,
    rouge: &RougeMeans,
) -> String {
    let mut s = String::new();
    if let Some(l) = latency_s {
        s += &format!("{label} (total latency: {} sec)\n", py_float(l));
    }
    if let Some(t) = output_tokens {
        s += &format!("{label} (total output tokens: {t})\n");
    }
    if let (Some(l), Some(t)) = (latency_s, output_tokens) {
        s += &format!("{label} (tokens per second: {})\n", py_float(t as f64 / l));
    }
    s += &format!("{label} beam 0 result\n");
    s += &format!("  rouge1: {}\n", py_float(rouge.rouge1));
    s += &format!("  rouge2: {}\n", py_float(rouge.rouge2));
    s += &format!("  rougeL: {}\n", py_float(rouge.rouge_l));
    s += &format!("  rougeLsum: {}\n", py_float(rouge.rouge_lsum));
    s
}

/// Our scores and the other system's side by side.
pub fn format_comparison(ours: &str, a: &RougeMeans, other: &str, b: &RougeMeans) -> String {
    let mut s = format!(
        "{:<10} {:>12} {:>12} {:>10}\n",
        "metric", ours, other, "diff"
    );
    for (name, x, y) in [
        ("rouge1", a.rouge1, b.rouge1),
        ("rouge2", a.rouge2, b.rouge2),
        ("rougeL", a.rouge_l, b.rouge_l),
        ("rougeLsum", a.rouge_lsum, b.rouge_lsum),
    ] {
        s += &format!("{name:<10} {x:>12.4} {y:>12.4} {:>+10.4}\n", x - y);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_matches_summarize_py() {
        // (article + ' TL;DR: ').strip().replace(" n't", "n't")
        assert_eq!(prompt_text("  He did n't go.\n"), "He didn't go.\n TL;DR:");
        assert_eq!(prompt_text("A"), "A TL;DR:");
    }

    #[test]
    fn block_formats_like_python() {
        let r = RougeMeans {
            rouge1: 25.5,
            rouge2: 1.0 / 3.0 * 100.0,
            rouge_l: 0.0,
            rouge_lsum: 100.0,
        };
        let b = format_block("dsv2", Some(2.0), Some(5), &r);
        assert!(b.contains("dsv2 (total latency: 2.0 sec)"));
        assert!(b.contains("dsv2 (tokens per second: 2.5)"));
        assert!(b.contains("  rouge2: 33.33333333333333\n"), "{b}");
        assert!(b.contains("  rougeLsum: 100.0\n"));
    }
}
