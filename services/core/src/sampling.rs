//! Next-token choice: greedy, or temperature → top-k → top-p sampling from a seeded ChaCha RNG
//! (same seed, same tokens, on every machine). Also the log-probabilities reported to clients.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{CoreError, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1.0 means no nucleus cut; must be in (0, 1].
    pub top_p: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(CoreError::InvalidInput(format!(
                "temperature: must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(CoreError::InvalidInput(format!(
                "top_p: must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    scratch: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            scratch: Vec::new(),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let u = self.rng.random::<f32>();
        sample_with_uniform(logits, &self.params, u, &mut self.scratch)
    }

    /// This row's settings and its next uniform draw, for a backend that samples on the device.
    /// Draws exactly when [`Sampler::sample`] would (not for greedy rows), so a sequence's RNG
    /// advances the same way whichever side samples.
    pub fn draw(&mut self) -> RowSampling {
        let uniform = if self.params.temperature == 0.0 {
            0.0
        } else {
            self.rng.random::<f32>()
        };
        RowSampling {
            temperature: self.params.temperature,
            top_k: self.params.top_k,
            top_p: self.params.top_p,
            uniform,
        }
    }
}

/// One token per row of host logits `logits` ([rows.len(), cols]) under each row's settings:
/// [`sample_with_uniform`] row by row (what a backend without device sampling does).
pub fn sample_rows_host(logits: &[f32], cols: usize, rows: &[RowSampling]) -> Vec<u32> {
    let mut scratch = Vec::new();
    rows.iter()
        .enumerate()
        .map(|(r, s)| {
            let p = SamplingParams {
                temperature: s.temperature,
                top_k: s.top_k,
                top_p: s.top_p,
                seed: None,
            };
            sample_with_uniform(
                &logits[r * cols..(r + 1) * cols],
                &p,
                s.uniform,
                &mut scratch,
            )
        })
        .collect()
}

/// One row's sampling settings and the uniform value in [0, 1) that drives its draw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSampling {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1.0 means no nucleus cut.
    pub top_p: f32,
    pub uniform: f32,
}

/// Temperature → top-k → top-p sampling of one row with the draw `u` in [0, 1): the kept tokens
/// in descending probability (ties: lower id first) and the first whose running mass passes
/// `u × mass`. `scratch` is reused between calls.
pub fn sample_with_uniform(
    logits: &[f32],
    params: &SamplingParams,
    u: f32,
    scratch: &mut Vec<(f32, u32)>,
) -> u32 {
    if params.temperature == 0.0 {
        return argmax(logits);
    }
    let t = params.temperature;
    // Subtract the row's largest logit before dividing: a tiny valid temperature (1e-45) turns
    // `l / t` into ±inf, and the softmax's inf - inf is NaN, which made the draw pick the least
    // likely token. Shifted first, the best token scores 0 and the rest go to -inf, as they should.
    let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let c = scratch;
    c.clear();
    c.extend(
        logits
            .iter()
            .enumerate()
            .map(|(i, &l)| ((l - top) / t, i as u32)),
    );
    c.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    if params.top_k > 0 {
        c.truncate(params.top_k);
    }
    let max = c[0].0;
    let mut sum = 0f32;
    for e in c.iter_mut() {
        e.0 = (e.0 - max).exp();
        sum += e.0;
    }
    // Nucleus: the smallest prefix whose probability reaches top_p.
    if params.top_p < 1.0 {
        let mut acc = 0f32;
        let mut keep = c.len();
        for (i, e) in c.iter().enumerate() {
            acc += e.0 / sum;
            if acc >= params.top_p {
                keep = i + 1;
                break;
            }
        }
        c.truncate(keep);
        sum = c.iter().map(|e| e.0).sum();
    }
    let mut u = u * sum;
    for e in c.iter() {
        if u < e.0 {
            return e.1;
        }
        u -= e.0;
    }
    c.last().map(|e| e.1).unwrap_or(0)
}

/// Index of the largest value; the lowest index among equals (as torch.argmax).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// log-softmax of one row of logits.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln() + max;
    logits.iter().map(|&l| l - lse).collect()
}

/// The `n` most likely tokens of a log-prob row, best first.
pub fn top_n(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    let n = n.min(idx.len());
    if n == 0 {
        return vec![];
    }
    idx.select_nth_unstable_by(n - 1, |&a, &b| {
        logprobs[b as usize]
            .total_cmp(&logprobs[a as usize])
            .then(a.cmp(&b))
    });
    idx.truncate(n);
    idx.sort_by(|&a, &b| {
        logprobs[b as usize]
            .total_cmp(&logprobs[a as usize])
            .then(a.cmp(&b))
    });
    idx.into_iter().map(|i| (i, logprobs[i as usize])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draw_advances_the_rng_exactly_as_sample_does() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = SamplingParams {
            temperature: 0.8,
            top_k: 20,
            top_p: 0.9,
            seed: Some(7),
        };
        let (mut a, mut b) = (Sampler::new(p.clone()), Sampler::new(p.clone()));
        let mut scratch = Vec::new();
        for _ in 0..20 {
            let r = b.draw();
            assert_eq!((r.temperature, r.top_k, r.top_p), (0.8, 20, 0.9));
            assert!((0.0..1.0).contains(&r.uniform));
            assert_eq!(
                a.sample(&logits),
                sample_with_uniform(&logits, &p, r.uniform, &mut scratch)
            );
        }
        // greedy rows draw nothing
        let mut g = Sampler::new(SamplingParams::default());
        assert_eq!(g.draw().uniform, 0.0);
    }

    #[test]
    fn tiny_and_huge_temperatures_stay_finite() {
        // Logits of both signs: `l / 1e-45` overflowed to +inf and -inf before the shift.
        let logits = [-2.0, 3.5, 1.0, -7.0, 3.25];
        let mut scratch = Vec::new();
        for t in [1e-45, f32::MIN_POSITIVE, 1e-30] {
            let p = SamplingParams {
                temperature: t,
                ..SamplingParams::default()
            };
            for u in [0.0, 0.5, 0.999_999] {
                assert_eq!(
                    sample_with_uniform(&logits, &p, u, &mut scratch),
                    1,
                    "t={t:e}"
                );
            }
        }
        // f32::MAX flattens the row to uniform: every token is reachable, none is NaN-picked.
        let p = SamplingParams {
            temperature: f32::MAX,
            ..SamplingParams::default()
        };
        let got: Vec<u32> = [0.05, 0.25, 0.45, 0.65, 0.85]
            .iter()
            .map(|&u| sample_with_uniform(&logits, &p, u, &mut scratch))
            .collect();
        assert_eq!(got, [1, 4, 2, 0, 3]);
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 2.0]), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            top_p: 1.0,
            seed: Some(7),
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p.clone());
            (0..100).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p.clone());
            (0..100).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        let mut allowed: Vec<u32> = (0..50).collect();
        allowed.sort_by(|&x, &y| logits[y as usize].total_cmp(&logits[x as usize]));
        for t in &a {
            assert!(allowed[..3].contains(t));
        }
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 1, "sampling never varied");
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let logits = [0.0, 5.0, 4.9, 1.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1e-6,
            seed: Some(1),
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&logits), 1);
        }
    }

    #[test]
    fn validation_names_the_field() {
        let bad = SamplingParams {
            top_p: 1.5,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("top_p"));
        let bad = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("temperature")
        );
    }

    #[test]
    fn log_softmax_and_top_n() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        assert!((lp.iter().map(|v| v.exp()).sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(
            top_n(&lp, 2).iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![2, 1]
        );
    }
}
