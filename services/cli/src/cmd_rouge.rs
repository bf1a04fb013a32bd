//! `dsv2 rouge`: ROUGE of two line files, scored like Google's rouge-score.

use anyhow::{Result, bail};
use clap::Args as ClapArgs;
use dsv2_rouge::{RougeOptions, aggregate, read_lines_file, score};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// One prediction per line (`\n` inside a text is written as a backslash and n).
    #[arg(long)]
    predictions: std::path::PathBuf,
    /// One reference per line, same order and count as the predictions.
    #[arg(long)]
    references: std::path::PathBuf,
    /// Apply the Porter stemmer (rouge-score's use_stemmer=True).
    #[arg(long)]
    stemmer: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let preds = read_lines_file(&a.predictions)?;
    let refs = read_lines_file(&a.references)?;
    if preds.len() != refs.len() {
        bail!(
            "{} has {} lines but {} has {}: they must pair up line by line",
            a.predictions.display(),
            preds.len(),
            a.references.display(),
            refs.len()
        );
    }
    let opts = RougeOptions {
        use_stemmer: a.stemmer,
    };
    let per: Vec<_> = preds
        .iter()
        .zip(&refs)
        .map(|(p, r)| score(p, r, &opts))
        .collect();
    let mean = aggregate(&per);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "samples": per.len(),
                "rouge1": mean.rouge1.fmeasure * 100.0,
                "rouge2": mean.rouge2.fmeasure * 100.0,
                "rougeL": mean.rouge_l.fmeasure * 100.0,
                "rougeLsum": mean.rouge_lsum.fmeasure * 100.0,
            })
        );
    } else {
        println!("{} samples (mean of per-sample F-measure, x100)", per.len());
        println!("  rouge1 : {:.6}", mean.rouge1.fmeasure * 100.0);
        println!("  rouge2 : {:.6}", mean.rouge2.fmeasure * 100.0);
        println!("  rougeL : {:.6}", mean.rouge_l.fmeasure * 100.0);
        println!("  rougeLsum : {:.6}", mean.rouge_lsum.fmeasure * 100.0);
    }
    Ok(())
}
