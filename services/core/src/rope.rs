//! Rotary position embedding with DeepSeek's YaRN extension (`DeepseekV2YarnRotaryEmbedding`).
//!
//! DeepSeek rotates the (x[2i], x[2i+1]) pairs of the rope part of q and k (the HF code
//! de-interleaves then applies rotate-half; the native transformers port multiplies complex pairs;
//! both give the same q·k). Cached k_pe is stored already rotated.

use crate::config::{ModelConfig, yarn_get_mscale};

#[derive(Debug, Clone)]
pub struct RopeTable {
    /// Inverse frequency of each rotated pair (dim / 2 values).
    pub inv_freq: Vec<f32>,
    /// YaRN's `_mscale`: cos and sin are multiplied by it.
    pub mscale: f32,
}

impl RopeTable {
    pub fn new(cfg: &ModelConfig) -> Self {
        let dim = cfg.qk_rope_head_dim;
        let base = cfg.rope_theta;
        let half = dim / 2;
        // torch computes base ** (arange(0, dim, 2).float() / dim) in float32.
        let pos_freq: Vec<f32> = (0..half)
            .map(|i| (base as f32).powf((2 * i) as f32 / dim as f32))
            .collect();
        match &cfg.rope_scaling {
            None => RopeTable {
                inv_freq: pos_freq.iter().map(|p| 1.0 / p).collect(),
                mscale: 1.0,
            },
            Some(y) => {
                let factor = y.factor as f32;
                let (low, high) = yarn_find_correction_range(
                    y.beta_fast,
                    y.beta_slow,
                    dim,
                    base,
                    y.original_max_position_embeddings,
                );
                let inv_freq = (0..half)
                    .map(|i| {
                        let extra = 1.0 / pos_freq[i];
                        let inter = 1.0 / (factor * pos_freq[i]);
                        let mask = 1.0 - yarn_linear_ramp(low, high, i);
                        inter * (1.0 - mask) + extra * mask
                    })
                    .collect();
                let mscale = (yarn_get_mscale(y.factor, y.mscale)
                    / yarn_get_mscale(y.factor, y.mscale_all_dim))
                    as f32;
                RopeTable { inv_freq, mscale }
            }
        }
    }

    /// Rotates `x` (the rope part of one head: dim values, pairs adjacent) for position `pos`.
    #[inline]
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let p = pos as f32;
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let angle = p * f;
            let (s, c) = angle.sin_cos();
            let (c, s) = (c * self.mscale, s * self.mscale);
            let (a, b) = (x[2 * i], x[2 * i + 1]);
            x[2 * i] = a * c - b * s;
            x[2 * i + 1] = a * s + b * c;
        }
    }
}

fn yarn_find_correction_dim(num_rotations: f64, dim: usize, base: f64, max_pos: usize) -> f64 {
    (dim as f64 * (max_pos as f64 / (num_rotations * 2.0 * std::f64::consts::PI)).ln())
        / (2.0 * base.ln())
}

fn yarn_find_correction_range(
    low_rot: f64,
    high_rot: f64,
    dim: usize,
    base: f64,
    max_pos: usize,
) -> (f32, f32) {
    let low = yarn_find_correction_dim(low_rot, dim, base, max_pos).floor();
    let high = yarn_find_correction_dim(high_rot, dim, base, max_pos).ceil();
    (low.max(0.0) as f32, high.min(dim as f64 - 1.0) as f32)
}

fn yarn_linear_ramp(min: f32, max: f32, i: usize) -> f32 {
    let max = if min == max { max + 0.001 } else { max };
    ((i as f32 - min) / (max - min)).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_rope_is_a_rotation() {
        let cfg =
            ModelConfig::from_json_str(r#"{"qk_rope_head_dim": 8, "rope_theta": 10000}"#).unwrap();
        let t = RopeTable::new(&cfg);
        assert_eq!(t.mscale, 1.0);
        assert!((t.inv_freq[1] - 10000f32.powf(-0.25)).abs() < 1e-7);
        let mut x = vec![1.0, 0.0, 0.5, 0.5, 0.0, 1.0, 2.0, -1.0];
        let norm0: f32 = x.iter().map(|v| v * v).sum();
        t.apply(&mut x, 5);
        let norm1: f32 = x.iter().map(|v| v * v).sum();
        assert!((norm0 - norm1).abs() < 1e-5);
        assert!((x[0] - 5f32.cos()).abs() < 1e-6 && (x[1] - 5f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn yarn_matches_deepseek_v2_values() {
        // DeepSeek-V2: dim 64, base 1e4, factor 40, original 4096, beta 32/1. Correction range is
        // [floor(10.19), ceil(22.98)] = [10, 23]: pairs below 10 keep their frequency, pairs at 23+
        // are divided by 40.
        let cfg = ModelConfig::from_json_str(
            r#"{"qk_rope_head_dim": 64, "rope_theta": 10000, "rope_scaling": {"type": "yarn",
            "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
            "mscale": 0.707, "mscale_all_dim": 0.707}}"#,
        )
        .unwrap();
        let t = RopeTable::new(&cfg);
        assert_eq!(t.mscale, 1.0);
        let base = |i: usize| 1.0 / 10000f32.powf(2.0 * i as f32 / 64.0);
        assert!((t.inv_freq[3] - base(3)).abs() < 1e-9);
        assert!((t.inv_freq[30] - base(30) / 40.0).abs() < 1e-12);
        let mid = t.inv_freq[16];
        assert!(mid < base(16) && mid > base(16) / 40.0);
    }
}
