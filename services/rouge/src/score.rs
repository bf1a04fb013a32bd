//! ROUGE-N (1, 2), ROUGE-L and ROUGE-Lsum scoring of one prediction against
//! one reference, ported from `rouge_score/rouge_scorer.py`, and the mean
//! aggregation over a corpus.

use std::collections::HashMap;

use serde::Serialize;

use crate::tokenize::tokenize;

/// Scoring options (the subset of `RougeScorer(...)` arguments we support).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RougeOptions {
    /// `use_stemmer=True`: Porter-stem tokens longer than three characters.
    pub use_stemmer: bool,
}

/// Precision, recall and F1 of one metric (rouge-score's `Score` tuple).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Score {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

impl Score {
    fn from_pr(precision: f64, recall: f64) -> Self {
        Self {
            precision,
            recall,
            fmeasure: fmeasure(precision, recall),
        }
    }
}

/// The four metrics rouge-score computes for `["rouge1", "rouge2", "rougeL",
/// "rougeLsum"]`. Serialized field names match rouge-score's keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct RougeScores {
    #[serde(rename = "rouge1")]
    pub rouge1: Score,
    #[serde(rename = "rouge2")]
    pub rouge2: Score,
    #[serde(rename = "rougeL")]
    pub rouge_l: Score,
    #[serde(rename = "rougeLsum")]
    pub rouge_lsum: Score,
}

/// `scoring.fmeasure`, with the same operation order so results are
/// bit-identical to Python.
fn fmeasure(precision: f64, recall: f64) -> f64 {
    if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    }
}

/// Maps token strings to small integers so n-gram counting and LCS compare
/// integers; ids are only meaningful within one `score` call.
#[derive(Default)]
struct Interner {
    ids: HashMap<String, usize>,
}

impl Interner {
    fn intern(&mut self, tokens: Vec<String>) -> Vec<usize> {
        tokens
            .into_iter()
            .map(|t| {
                let next = self.ids.len();
                *self.ids.entry(t).or_insert(next)
            })
            .collect()
    }
}

/// Scores `prediction` against `reference`, like rouge-score's
/// `RougeScorer.score(target=reference, prediction=prediction)`.
///
/// Precision is relative to the prediction, recall to the reference.
/// ROUGE-Lsum splits both texts into sentences on `'\n'` (rouge-score's
/// default `split_summaries=False`), dropping empty lines.
pub fn score(prediction: &str, reference: &str, opts: &RougeOptions) -> RougeScores {
    let stem = opts.use_stemmer;
    let mut interner = Interner::default();
    let ref_tokens = interner.intern(tokenize(reference, stem));
    let pred_tokens = interner.intern(tokenize(prediction, stem));

    let sentences = |text: &str, interner: &mut Interner| -> Vec<Vec<usize>> {
        text.split('\n')
            .filter(|s| !s.is_empty())
            .map(|s| interner.intern(tokenize(s, stem)))
            .collect()
    };
    let ref_sents = sentences(reference, &mut interner);
    let pred_sents = sentences(prediction, &mut interner);

    RougeScores {
        rouge1: score_ngrams(&ref_tokens, &pred_tokens, 1),
        rouge2: score_ngrams(&ref_tokens, &pred_tokens, 2),
        rouge_l: score_lcs(&ref_tokens, &pred_tokens),
        rouge_lsum: summary_level_lcs(&ref_sents, &pred_sents),
    }
}

/// Mean of per-sample precision, recall and F-measure for every metric.
///
/// rouge-score's `BootstrapAggregator` instead reports the median ("mid") of
/// 1000 bootstrap-resampled means, which is random (numpy's global RNG) and
/// only approximately the mean; we report the exact mean, which is what the
/// bootstrap estimates. An empty slice gives all zeros.
pub fn aggregate(samples: &[RougeScores]) -> RougeScores {
    if samples.is_empty() {
        return RougeScores::default();
    }
    let n = samples.len() as f64;
    let mean = |get: fn(&RougeScores) -> Score| {
        let (mut p, mut r, mut f) = (0.0, 0.0, 0.0);
        for s in samples {
            let x = get(s);
            p += x.precision;
            r += x.recall;
            f += x.fmeasure;
        }
        Score {
            precision: p / n,
            recall: r / n,
            fmeasure: f / n,
        }
    };
    RougeScores {
        rouge1: mean(|s| s.rouge1),
        rouge2: mean(|s| s.rouge2),
        rouge_l: mean(|s| s.rouge_l),
        rouge_lsum: mean(|s| s.rouge_lsum),
    }
}

fn ngram_counts(tokens: &[usize], n: usize) -> HashMap<&[usize], usize> {
    let mut counts = HashMap::new();
    if tokens.len() >= n {
        for g in tokens.windows(n) {
            *counts.entry(g).or_insert(0) += 1;
        }
    }
    counts
}

/// `_score_ngrams`: clipped n-gram overlap; empty sides count as 1 in the
/// denominators (so scores are 0, not NaN).
fn score_ngrams(reference: &[usize], prediction: &[usize], n: usize) -> Score {
    let ref_counts = ngram_counts(reference, n);
    let pred_counts = ngram_counts(prediction, n);
    let overlap: usize = ref_counts
        .iter()
        .map(|(g, &c)| c.min(pred_counts.get(g).copied().unwrap_or(0)))
        .sum();
    let ref_total: usize = ref_counts.values().sum();
    let pred_total: usize = pred_counts.values().sum();
    Score::from_pr(
        overlap as f64 / pred_total.max(1) as f64,
        overlap as f64 / ref_total.max(1) as f64,
    )
}

/// `_score_lcs`: LCS length over prediction / reference lengths.
fn score_lcs(reference: &[usize], prediction: &[usize]) -> Score {
    if reference.is_empty() || prediction.is_empty() {
        return Score::default();
    }
    // Two-row DP: only the length is needed here.
    let mut prev = vec![0u32; prediction.len() + 1];
    let mut cur = vec![0u32; prediction.len() + 1];
    for &r in reference {
        for (j, &c) in prediction.iter().enumerate() {
            cur[j + 1] = if r == c {
                prev[j] + 1
            } else {
                prev[j + 1].max(cur[j])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    let lcs = f64::from(prev[prediction.len()]);
    Score::from_pr(lcs / prediction.len() as f64, lcs / reference.len() as f64)
}

/// `lcs_ind`: indices into `reference` of one LCS with `candidate`, chosen
/// by `_backtrack_norec`'s tie-breaking (which LCS is picked changes the
/// union in ROUGE-Lsum, so the order of comparisons matters).
fn lcs_indices(reference: &[usize], candidate: &[usize]) -> Vec<usize> {
    let cols = candidate.len() + 1;
    let mut table = vec![0u32; (reference.len() + 1) * cols];
    for i in 1..=reference.len() {
        for j in 1..=candidate.len() {
            table[i * cols + j] = if reference[i - 1] == candidate[j - 1] {
                table[(i - 1) * cols + j - 1] + 1
            } else {
                table[(i - 1) * cols + j].max(table[i * cols + j - 1])
            };
        }
    }
    let (mut i, mut j) = (reference.len(), candidate.len());
    let mut out = Vec::new();
    while i > 0 && j > 0 {
        if reference[i - 1] == candidate[j - 1] {
            out.push(i - 1);
            i -= 1;
            j -= 1;
        } else if table[i * cols + j - 1] > table[(i - 1) * cols + j] {
            j -= 1;
        } else {
            i -= 1;
        }
    }
    out.reverse();
    out
}

/// `_summary_level_lcs`: for each reference sentence, the union of its LCS
/// with every candidate sentence; hits are clipped by token counts on both
/// sides (ROUGE 1.5.5's protection against double counting).
fn summary_level_lcs(ref_sents: &[Vec<usize>], cand_sents: &[Vec<usize>]) -> Score {
    if ref_sents.is_empty() || cand_sents.is_empty() {
        return Score::default();
    }
    let m: usize = ref_sents.iter().map(Vec::len).sum();
    let n: usize = cand_sents.iter().map(Vec::len).sum();
    if m == 0 || n == 0 {
        return Score::default();
    }
    let mut ref_counts: HashMap<usize, usize> = HashMap::new();
    let mut cand_counts: HashMap<usize, usize> = HashMap::new();
    for &t in ref_sents.iter().flatten() {
        *ref_counts.entry(t).or_insert(0) += 1;
    }
    for &t in cand_sents.iter().flatten() {
        *cand_counts.entry(t).or_insert(0) += 1;
    }
    let mut hits = 0usize;
    for r in ref_sents {
        // sorted(set().union(*lcs_list))
        let mut union: Vec<usize> = cand_sents.iter().flat_map(|c| lcs_indices(r, c)).collect();
        union.sort_unstable();
        union.dedup();
        for idx in union {
            let t = r[idx];
            let (Some(cc), Some(rc)) = (cand_counts.get_mut(&t), ref_counts.get_mut(&t)) else {
                continue;
            };
            if *cc > 0 && *rc > 0 {
                hits += 1;
                *cc -= 1;
                *rc -= 1;
            }
        }
    }
    Score::from_pr(hits as f64 / n as f64, hits as f64 / m as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn rouge_score_docstring_example() {
        // From rouge_scorer_test.py: testRouge1 / testRougeL style values
        // computed by hand: target "The quick brown fox jumps over the lazy
        // dog", prediction "The quick brown dog jumps on the log."
        let s = score(
            "The quick brown dog jumps on the log.",
            "The quick brown fox jumps over the lazy dog",
            &RougeOptions::default(),
        );
        // unigram overlap: the x2, quick, brown, dog, jumps = 6; pred 8, ref 9
        assert!(close(s.rouge1.precision, 6.0 / 8.0));
        assert!(close(s.rouge1.recall, 6.0 / 9.0));
        // bigrams: "the quick", "quick brown" = 2; pred 7, ref 8
        assert!(close(s.rouge2.precision, 2.0 / 7.0));
        assert!(close(s.rouge2.recall, 2.0 / 8.0));
        // LCS: the quick brown jumps the = 5
        assert!(close(s.rouge_l.precision, 5.0 / 8.0));
        assert!(close(s.rouge_l.recall, 5.0 / 9.0));
        assert!(close(s.rouge_lsum.fmeasure, s.rouge_l.fmeasure));
    }

    #[test]
    fn empty_sides_score_zero() {
        let o = RougeOptions::default();
        for (p, r) in [("", "a b"), ("a b", ""), ("", ""), ("!!", "...")] {
            assert_eq!(score(p, r, &o), RougeScores::default());
        }
    }

    #[test]
    fn lsum_union_clips_counts() {
        // Reference sentence "a b c" vs candidate sentences "a b" and "b c":
        // union LCS covers a, b, c but "b" appears once in the reference.
        let s = score("a b\nb c", "a b c", &RougeOptions::default());
        assert!(close(s.rouge_lsum.recall, 3.0 / 3.0));
        assert!(close(s.rouge_lsum.precision, 3.0 / 4.0));
    }

    #[test]
    fn aggregate_is_mean() {
        let o = RougeOptions::default();
        let a = score("a b c", "a b c", &o);
        let b = score("x y", "a b", &o);
        let m = aggregate(&[a, b]);
        assert!(close(m.rouge1.fmeasure, 0.5));
        assert!(close(m.rouge_l.precision, 0.5));
        assert_eq!(aggregate(&[]), RougeScores::default());
    }
}
