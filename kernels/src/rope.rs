//! YaRN rotary embedding tables, computed on the host exactly as DeepSeek's
//! `DeepseekV2YarnRotaryEmbedding` does (f32 steps where it uses f32), and their device copy.

use crate::device::Gpu;
use crate::error::{Result, shape_err};
use crate::tensor::Tensor;

/// The rope_scaling block of the model config plus the rotary dim and base.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct YarnConfig {
    /// qk_rope_head_dim (64 for DeepSeek-V2).
    pub dim: usize,
    /// rope_theta (10000).
    pub base: f32,
    /// factor (40 for DeepSeek-V2); <= 1 means plain RoPE.
    pub factor: f32,
    /// original_max_position_embeddings (4096).
    pub original_max_pos: usize,
    pub beta_fast: f32,
    pub beta_slow: f32,
    pub mscale: f32,
    pub mscale_all_dim: f32,
}

impl YarnConfig {
    /// DeepSeek-V2 (236B and Lite share these values).
    pub fn deepseek_v2() -> Self {
        Self {
            dim: 64,
            base: 10000.0,
            factor: 40.0,
            original_max_pos: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 0.707,
            mscale_all_dim: 0.707,
        }
    }
}

/// `yarn_get_mscale`: 0.1 * mscale * ln(scale) + 1 for scale > 1, else 1.
pub fn get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

fn correction_dim(num_rot: f64, dim: f64, base: f64, max_pos: f64) -> f64 {
    (dim * (max_pos / (num_rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln())
}

/// The YaRN inverse frequencies [dim / 2] (f32, as the reference computes them).
pub fn yarn_inv_freq(c: &YarnConfig) -> Vec<f32> {
    let half = c.dim / 2;
    let (base, dim, omax) = (c.base as f64, c.dim as f64, c.original_max_pos as f64);
    let low = correction_dim(c.beta_fast as f64, dim, base, omax)
        .floor()
        .max(0.0);
    let high = correction_dim(c.beta_slow as f64, dim, base, omax)
        .ceil()
        .min(dim - 1.0);
    let (low, mut high) = (low as f32, high as f32);
    if low == high {
        high += 0.001;
    }
    (0..half)
        .map(|i| {
            // torch: base ** (arange(0, dim, 2, f32) / dim) in f32
            let e = (2 * i) as f32 / c.dim as f32;
            let pw = c.base.powf(e);
            let freq_extra = 1.0 / pw;
            let freq_inter = 1.0 / (c.factor * pw);
            let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
            let mask = 1.0 - ramp;
            freq_inter * (1.0 - mask) + freq_extra * mask
        })
        .collect()
}

/// cos and sin tables, each [max_pos, dim/2] row-major f32, already multiplied by
/// get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim).
pub fn yarn_cos_sin(c: &YarnConfig, max_pos: usize) -> (Vec<f32>, Vec<f32>) {
    let inv = yarn_inv_freq(c);
    let ms = (get_mscale(c.factor as f64, c.mscale as f64)
        / get_mscale(c.factor as f64, c.mscale_all_dim as f64)) as f32;
    let half = c.dim / 2;
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for t in 0..max_pos {
        for f in &inv {
            let a = t as f32 * f; // torch.outer in f32
            cos.push((a as f64).cos() as f32 * ms);
            sin.push((a as f64).sin() as f32 * ms);
        }
    }
    (cos, sin)
}

/// The softmax scale of DeepSeek's MLA with YaRN: q_head_dim^-0.5 * mscale_all_dim_factor^2.
pub fn yarn_softmax_scale(c: &YarnConfig, q_head_dim: usize) -> f32 {
    let m = get_mscale(c.factor as f64, c.mscale_all_dim as f64);
    ((q_head_dim as f64).powf(-0.5) * m * m) as f32
}

/// The device copy of a cos/sin table.
pub struct RopeTable {
    pub cos: Tensor<f32>,
    pub sin: Tensor<f32>,
    pub max_pos: usize,
    pub rope_dim: usize,
}

impl RopeTable {
    pub fn new(gpu: &Gpu, c: &YarnConfig, max_pos: usize) -> Result<Self> {
        let (cos, sin) = yarn_cos_sin(c, max_pos);
        Self::from_host(gpu, &cos, &sin, max_pos, c.dim)
    }

    pub fn from_host(
        gpu: &Gpu,
        cos: &[f32],
        sin: &[f32],
        max_pos: usize,
        rope_dim: usize,
    ) -> Result<Self> {
        if !rope_dim.is_multiple_of(2)
            || cos.len() != max_pos * rope_dim / 2
            || sin.len() != cos.len()
        {
            return Err(shape_err(
                "RopeTable",
                format!(
                    "cos/sin of {} values for max_pos {max_pos}, rope_dim {rope_dim}",
                    cos.len()
                ),
            ));
        }
        Ok(Self {
            cos: Tensor::from_host(gpu, cos, &[max_pos, rope_dim / 2])?,
            sin: Tensor::from_host(gpu, sin, &[max_pos, rope_dim / 2])?,
            max_pos,
            rope_dim,
        })
    }

    pub(crate) fn cos_ptr(&self) -> u64 {
        self.cos.ptr()
    }

    pub(crate) fn sin_ptr(&self) -> u64 {
        self.sin.ptr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by the Python formula of DeepseekV2YarnRotaryEmbedding (torch f32) for the
    /// DeepSeek-V2 config: inv_freq[0], [10], [20], [31].
    #[test]
    fn inv_freq_matches_deepseek_formula() {
        let inv = yarn_inv_freq(&YarnConfig::deepseek_v2());
        assert_eq!(inv.len(), 32);
        // low = floor(corr(32)) = 10, high = ceil(corr(1)) = 23 for dim 64, base 1e4, 4096
        // i < 10: pure extrapolation (freq_extra); i > 23: pure interpolation (freq_extra / 40)
        let extra = |i: usize| 1.0 / 10000f32.powf((2 * i) as f32 / 64.0);
        assert_eq!(inv[0], extra(0));
        assert_eq!(inv[9], extra(9));
        assert!((inv[31] - extra(31) / 40.0).abs() <= 1e-12);
        // in the ramp the value lies between the two
        assert!(inv[15] < extra(15) && inv[15] > extra(15) / 40.0);
        assert_eq!(get_mscale(40.0, 0.707) / get_mscale(40.0, 0.707), 1.0);
        assert!((get_mscale(40.0, 1.0) - (0.1 * 40f64.ln() + 1.0)).abs() < 1e-12);
    }
}
