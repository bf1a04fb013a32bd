//! The bench's prompts: distinct seeded random token ids (a SplitMix64 stream per sequence, so
//! bench/prompts.py draws the very same ids), or the lines of a text file through the model's
//! tokenizer; copies of one prompt only when asked for by name.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use dsv2_core::tokenizer::Tokenizer;

/// Where the prompts come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Seeded random ids, `len` tokens each (the prompt of a shorter context is a prefix).
    Random { seed: u64 },
    /// One prompt per non-empty line, tokenized with the model's tokenizer.
    File { path: PathBuf, seqs: Vec<Vec<u32>> },
}

/// The prompts of one bench run.
#[derive(Debug, Clone)]
pub struct Prompts {
    pub source: Source,
    /// Every sequence of a batch gets the prompt of sequence 0 (`--same-prompt`).
    pub same: bool,
    vocab: u32,
    /// Ids a random prompt never holds (BOS / EOS would end or restart a sequence).
    special: Vec<u32>,
}

/// SplitMix64 (Steele, Lea, Flood 2014): a 64-bit generator simple enough to write identically
/// in Python (bench/prompts.py), which is what makes the HF comparison take the same ids.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The first `len` ids of sequence `index`'s stream under `seed`: uniform over `0..vocab` minus
/// `special` (a draw that hits one is drawn again).
pub fn random_prompt(seed: u64, index: usize, len: usize, vocab: u32, special: &[u32]) -> Vec<u32> {
    let mut state = seed ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let id = (splitmix64(&mut state) % u64::from(vocab.max(1))) as u32;
        if !special.contains(&id) {
            out.push(id);
        }
    }
    out
}

impl Prompts {
    pub fn random(seed: u64, same: bool, vocab: usize, mut special: Vec<u32>) -> Result<Self> {
        special.sort_unstable();
        special.dedup();
        let vocab = u32::try_from(vocab).context("vocabulary larger than u32")?;
        if (0..vocab).all(|id| special.contains(&id)) {
            bail!("every id of the {vocab}-token vocabulary is a special token");
        }
        Ok(Prompts {
            source: Source::Random { seed },
            same,
            vocab,
            special,
        })
    }

    /// One prompt per non-empty line of `path`, BOS first where the tokenizer asks for it.
    pub fn from_file(path: &Path, tok: &Tokenizer, same: bool) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--prompts: cannot read {}", path.display()))?;
        let seqs = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| tok.encode_prompt(l))
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("--prompts: tokenizing {}", path.display()))?;
        if seqs.is_empty() || seqs.iter().any(|s| s.is_empty()) {
            bail!("--prompts: {} has no prompt to use", path.display());
        }
        Ok(Prompts {
            source: Source::File {
                path: path.to_path_buf(),
                seqs,
            },
            same,
            vocab: 0,
            special: Vec::new(),
        })
    }

    /// The prompts of a batch of `batch` sequences; `len` is the prompt length for random
    /// prompts (a file's prompts keep their own lengths).
    pub fn batch(&self, batch: usize, len: usize) -> Vec<Vec<u32>> {
        (0..batch)
            .map(|i| {
                let i = if self.same { 0 } else { i };
                match &self.source {
                    Source::Random { seed } => {
                        random_prompt(*seed, i, len, self.vocab, &self.special)
                    }
                    Source::File { seqs, .. } => seqs[i % seqs.len()].clone(),
                }
            })
            .collect()
    }

    /// How many different prompts a batch holds.
    pub fn distinct(seqs: &[Vec<u32>]) -> usize {
        seqs.iter().collect::<HashSet<_>>().len()
    }

    /// One line for humans: where the prompts come from and whether they are copies.
    pub fn label(&self) -> String {
        let what = match &self.source {
            Source::Random { seed } => format!("seeded random token ids (seed {seed})"),
            Source::File { path, seqs } => format!(
                "{} prompts of {} (reused in turn when a batch is larger)",
                seqs.len(),
                path.display()
            ),
        };
        if self.same {
            format!(
                "ONE PROMPT REPEATED (--same-prompt): every sequence is a copy of sequence 0's \
                 prompt, so all rows route alike and the MoE cost is hidden; {what}"
            )
        } else {
            format!("distinct prompts: {what}")
        }
    }

    pub fn json(&self) -> serde_json::Value {
        let (kind, seed, file) = match &self.source {
            Source::Random { seed } => ("random", Some(*seed), None),
            Source::File { path, .. } => ("file", None, Some(path.display().to_string())),
        };
        serde_json::json!({
            "source": kind, "seed": seed, "file": file, "same_prompt": self.same,
            "special_ids_excluded": self.special, "label": self.label(),
        })
    }

    /// Writes the ids of the largest batch at the longest context, one sequence per line
    /// (comma-separated, `#` lines are comments): what bench/hf_cpu_decode.py --prompt-file
    /// reads. A smaller batch is the first lines, a shorter random context a prefix of each line.
    pub fn dump(&self, path: &Path, batch: usize, len: usize) -> Result<()> {
        let mut out = format!(
            "# dsv2 bench prompts: {}\n# one sequence per line, comma-separated token ids; a \
             batch of B takes the first B lines, a prompt of L tokens the first L ids\n",
            self.label()
        );
        for seq in self.batch(batch, len) {
            let ids: Vec<String> = seq.iter().map(u32::to_string).collect();
            out.push_str(&ids.join(","));
            out.push('\n');
        }
        std::fs::write(path, out)
            .with_context(|| format!("--dump-prompts: cannot write {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_prompts_are_distinct_reproducible_and_avoid_special_ids() {
        let p = Prompts::random(7, false, 50, vec![0, 1]).unwrap();
        let a = p.batch(16, 24);
        assert_eq!(a.len(), 16);
        assert!(a.iter().all(|s| s.len() == 24));
        assert_eq!(Prompts::distinct(&a), 16, "{a:?}");
        assert!(a.iter().flatten().all(|&t| (2..50).contains(&t)));
        assert_eq!(a, p.batch(16, 24), "same seed, same ids");
        // A shorter context is a prefix, a smaller batch the first sequences.
        let b = p.batch(4, 10);
        for (s, l) in b.iter().zip(&a) {
            assert_eq!(s[..], l[..10]);
        }
        let other = Prompts::random(8, false, 50, vec![0, 1])
            .unwrap()
            .batch(16, 24);
        assert_ne!(a, other, "another seed, other ids");
    }

    #[test]
    fn same_prompt_copies_sequence_zero_and_says_so() {
        let p = Prompts::random(7, true, 1000, vec![]).unwrap();
        let a = p.batch(8, 12);
        assert_eq!(Prompts::distinct(&a), 1);
        assert_eq!(a[0], random_prompt(7, 0, 12, 1000, &[]));
        assert!(p.label().starts_with("ONE PROMPT REPEATED (--same-prompt)"));
        assert!(
            Prompts::random(7, false, 1000, vec![])
                .unwrap()
                .label()
                .starts_with("distinct")
        );
    }

    /// The values bench/prompts.py must reproduce (its self-test holds the same numbers).
    #[test]
    fn splitmix_stream_is_pinned() {
        assert_eq!(
            random_prompt(0, 0, 4, 102400, &[]),
            vec![73135, 26100, 83279, 49644]
        );
        assert_eq!(random_prompt(1, 3, 3, 1024, &[0, 1]), vec![333, 13, 706]);
    }

    #[test]
    fn an_all_special_vocabulary_is_refused() {
        assert!(Prompts::random(0, false, 2, vec![0, 1]).is_err());
    }
}
