//! The FP8 (e4m3) latent cache format: the e4m3 code (the OCP "FN" variant CUDA calls
//! `__NV_E4M3`: bias 7, no infinities, 448 the largest finite value), the per-token quantizer
//! every GPU kernel reproduces bit for bit, and where each piece of a cached token lies.
//!
//! # Layout of one cached token (one layer), `Fp8Layout`
//! ```text
//! bytes [0, r)                   the r latent values c_kv, e4m3, quantized with the token's scale
//! bytes [pe, pe + 2 dr)          the dr rotated RoPE key values k_pe, bf16 (pe = r rounded up to 16)
//! bytes [sc, sc + 4)             the token's scale, f32 (sc = pe + 2 dr rounded up to 16)
//! bytes [sc + 4, sc + 16)        zeros
//! ```
//! DeepSeek-V2 (r 512, dr 64): 512 + 128 + 16 = 656 bytes a token, against 1,152 in bf16 (0.57 ×).
//! Why this shape:
//! - k_pe stays bf16 (FlashMLA's FP8 cache does the same): the 64 RoPE dims are an eighth of the
//!   bytes but carry the position signal, whose rotation makes their magnitudes uneven across
//!   dims; quantizing them saves 64 B a token (10 %) for most of the accuracy risk.
//! - One f32 scale per token, amax / 448 over the token's 512 latent values: the latent is an
//!   RMSNorm output times a learned gain, so rows share a similar range; one scale per token is
//!   what a token-by-token append can compute alone (no block-wide statistics) and what decode
//!   can apply per column of S.
//! - The scale inside the row (12 bytes of padding, 1.8 %) rather than in a separate array: a
//!   token is one contiguous record, so a cache block stays one contiguous run of bytes (the
//!   host tier and the prefix cache copy blocks, not tensors), and every piece starts on a
//!   16-byte boundary (16-byte vector loads, cp.async, TMA boxes with a 656-byte row stride).
//!
//! # Quantizer (per token, over the latent values as the bf16 cache would hold them)
//! `amax = max |x|`; `scale = amax / 448`; `q = e4m3_rn_satfinite(x * (448 / amax))`; a zero row
//! (amax = 0) stores scale 0 and zero codes. Dequantized: `decode(q) * scale`. Round to nearest
//! even: the error of one value is at most half a step, 2^-4 of its binade (relative error
//! ≤ 2^-4, RMS ≈ 2.7 % for values spread over a binade), or 2^-10 · scale below the normal range
//! (|x| < amax / 28,672). `x * (448 / amax)` may round to just above 448: saturation clamps it.

/// Largest finite e4m3 value.
pub const E4M3_MAX: f32 = 448.0;

/// The e4m3 code of `x`, rounded to nearest even, saturating to ±448 (infinities too); NaN gives
/// 0x7f (what `cvt.rn.satfinite.e4m3x2.f32` does).
pub fn e4m3_from_f32(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7e;
    }
    // the step of a's binade: 2^(e - 3) for normal a in [2^e, 2^(e+1)), 2^-9 below 2^-6
    let e = if a == 0.0 {
        -6
    } else {
        ((a.to_bits() >> 23) as i32 - 127).max(-6)
    };
    let step = 2f32.powi(e - 3);
    // a / step is exact (a power of two); 0 <= k <= 16
    let k = (a / step).round_ties_even();
    let v = (k * step).min(E4M3_MAX);
    if v == 0.0 {
        return sign;
    }
    if v < 2f32.powi(-6) {
        // subnormal: v = m · 2^-9, m in 1..=7
        return sign | (v * 512.0) as u8;
    }
    let ve = (v.to_bits() >> 23) as i32 - 127;
    let m = ((v / 2f32.powi(ve) - 1.0) * 8.0) as u8;
    sign | (((ve + 7) as u8) << 3) | m
}

/// The value of an e4m3 code (0x7f / 0xff are NaN; the quantizer never writes them).
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((b >> 3) & 0xf) as i32;
    let m = (b & 7) as f32;
    if e == 15 && b & 7 == 7 {
        return f32::NAN;
    }
    let v = if e == 0 {
        m * 2f32.powi(-9)
    } else {
        (1.0 + m / 8.0) * 2f32.powi(e - 7)
    };
    sign * v
}

/// The per-token scale and codes of a row of latent values (see the module comment).
pub fn quantize_row(x: &[f32]) -> (f32, Vec<u8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        return (0.0, vec![0; x.len()]);
    }
    let inv = E4M3_MAX / amax;
    (
        amax / E4M3_MAX,
        x.iter().map(|&v| e4m3_from_f32(v * inv)).collect(),
    )
}

/// `decode(q) * scale` for every code of a row.
pub fn dequantize_row(scale: f32, q: &[u8]) -> Vec<f32> {
    q.iter().map(|&b| e4m3_to_f32(b) * scale).collect()
}

/// Where the pieces of one cached token lie (module comment), for a latent of `kv_lora` values
/// and a RoPE key of `rope` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Layout {
    pub kv_lora: usize,
    pub rope: usize,
}

const fn align16(n: usize) -> usize {
    n.div_ceil(16) * 16
}

impl Fp8Layout {
    /// DeepSeek-V2's (and V2-Lite's) latent: 512 + 64.
    pub const DEEPSEEK_V2: Fp8Layout = Fp8Layout {
        kv_lora: 512,
        rope: 64,
    };

    /// The layout for these dims, or why the kernels cannot hold them: they move the latent in
    /// 16-byte pieces (16 codes) and the key in 16-byte pieces (8 bf16 values).
    pub fn new(kv_lora: usize, rope: usize) -> Result<Self, String> {
        if kv_lora == 0 || !kv_lora.is_multiple_of(16) || !rope.is_multiple_of(8) {
            return Err(format!(
                "the fp8 latent cache needs kv_lora_rank a positive multiple of 16 and qk_rope_head_dim a multiple of 8 (got {kv_lora} and {rope})"
            ));
        }
        Ok(Fp8Layout { kv_lora, rope })
    }

    /// Byte offset of the bf16 RoPE key.
    pub const fn pe_offset(&self) -> usize {
        align16(self.kv_lora)
    }

    /// Byte offset of the f32 scale.
    pub const fn scale_offset(&self) -> usize {
        self.pe_offset() + align16(2 * self.rope)
    }

    /// Bytes of one cached token.
    pub const fn row_bytes(&self) -> usize {
        self.scale_offset() + 16
    }

    /// One token's cache row from its latent values (quantized here) and its k_pe (rounded to
    /// bf16), as the append kernel writes it.
    pub fn encode(&self, latent: &[f32], k_pe: &[f32]) -> Vec<u8> {
        let mut row = vec![0u8; self.row_bytes()];
        let (scale, q) = quantize_row(&latent[..self.kv_lora]);
        row[..self.kv_lora].copy_from_slice(&q);
        for (i, v) in k_pe[..self.rope].iter().enumerate() {
            let b = half::bf16::from_f32(*v).to_le_bytes();
            row[self.pe_offset() + 2 * i..][..2].copy_from_slice(&b);
        }
        row[self.scale_offset()..][..4].copy_from_slice(&scale.to_le_bytes());
        row
    }

    /// The token's values as decode reads them: the dequantized latent (f32, unrounded) then
    /// k_pe.
    pub fn decode(&self, row: &[u8]) -> Vec<f32> {
        let mut out = dequantize_row(self.scale(row), &row[..self.kv_lora]);
        out.extend((0..self.rope).map(|i| {
            let p = self.pe_offset() + 2 * i;
            half::bf16::from_le_bytes([row[p], row[p + 1]]).to_f32()
        }));
        out
    }

    /// The token's scale.
    pub fn scale(&self, row: &[u8]) -> f32 {
        let s = self.scale_offset();
        f32::from_le_bytes([row[s], row[s + 1], row[s + 2], row[s + 3]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_finite_code_round_trips_and_codes_are_ordered() {
        let mut prev = f32::NEG_INFINITY;
        // positive codes in increasing order, then check the negatives mirror them
        for b in 0u8..0x7f {
            let v = e4m3_to_f32(b);
            assert!(v.is_finite(), "{b:#x}");
            assert_eq!(e4m3_from_f32(v), b, "{b:#x} = {v}");
            assert_eq!(e4m3_to_f32(b | 0x80), -v);
            if b > 0 {
                assert!(v > prev, "{b:#x}: {v} after {prev}");
                assert_eq!(e4m3_from_f32(-v), b | 0x80);
            }
            prev = v;
        }
        assert!(e4m3_to_f32(0x7f).is_nan() && e4m3_to_f32(0xff).is_nan());
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
    }

    #[test]
    fn rounding_is_to_nearest_even_and_saturates() {
        // between 1 (0x38) and 1.125 (0x39): the midpoint goes to the even code
        assert_eq!(e4m3_from_f32(1.0625), 0x38);
        assert_eq!(e4m3_from_f32(1.0626), 0x39);
        // between 1.125 (0x39) and 1.25 (0x3a): the midpoint goes up, to the even code
        assert_eq!(e4m3_from_f32(1.1875), 0x3a);
        // subnormals: steps of 2^-9; half the smallest rounds to zero (even), more rounds up
        assert_eq!(e4m3_from_f32(2f32.powi(-10)), 0x00);
        assert_eq!(e4m3_from_f32(1.01 * 2f32.powi(-10)), 0x01);
        assert_eq!(e4m3_from_f32(-3.0 * 2f32.powi(-9)), 0x83);
        // the top of the subnormals rounds into the first normal binade
        assert_eq!(e4m3_from_f32(7.6 * 2f32.powi(-9)), 0x08);
        // saturation: anything from 448 up, infinities included
        for x in [448.0, 460.0, 464.0, 470.0, 1e6, f32::INFINITY] {
            assert_eq!(e4m3_from_f32(x), 0x7e, "{x}");
            assert_eq!(e4m3_from_f32(-x), 0xfe, "{x}");
        }
        assert_eq!(e4m3_from_f32(f32::NAN), 0x7f);
        assert_eq!(e4m3_from_f32(-0.0), 0x80);
    }

    #[test]
    fn quantized_rows_are_within_half_a_step() {
        // a row spread over eight binades, signs mixed
        let x: Vec<f32> = (0..512)
            .map(|i| {
                let m = 1.0 + ((i * 37) % 100) as f32 / 100.0;
                let v = m * 2f32.powi(i % 8 - 6);
                if i % 3 == 0 { -v } else { v }
            })
            .collect();
        let (scale, q) = quantize_row(&x);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(scale, amax / 448.0);
        let y = dequantize_row(scale, &q);
        let (mut se, mut sx) = (0f64, 0f64);
        for (a, b) in x.iter().zip(&y) {
            // half a step of the binade, or half the subnormal step, in units of the scale
            let bound = (a.abs() * 2f32.powi(-4)).max(2f32.powi(-10) * scale) * 1.0001;
            assert!((a - b).abs() <= bound, "{a} -> {b} (bound {bound})");
            se += ((a - b) as f64).powi(2);
            sx += (*a as f64).powi(2);
        }
        let rel_l2 = (se / sx).sqrt();
        assert!(rel_l2 < 0.035, "rel_l2 {rel_l2}");
        // amax itself is exact: it maps to 448
        let i = x.iter().position(|v| v.abs() == amax).unwrap_or(0);
        assert_eq!(q[i] & 0x7f, 0x7e);
        assert_eq!(y[i], x[i]);
    }

    #[test]
    fn zero_rows_and_single_values() {
        let (s, q) = quantize_row(&[0.0; 16]);
        assert_eq!(s, 0.0);
        assert!(q.iter().all(|&b| b == 0));
        assert!(dequantize_row(s, &q).iter().all(|&v| v == 0.0));
        // one nonzero value: it becomes ±448 · scale, exactly itself
        let mut x = vec![0.0f32; 16];
        x[5] = -0.37;
        let (s, q) = quantize_row(&x);
        assert_eq!(q[5], 0xfe);
        assert_eq!(dequantize_row(s, &q)[5], -0.37);
    }

    /// The kernels (mla_fp8.cu) decode codes by placing their bits in an f32 (f8_to_f32) or a
    /// bf16 (f8x2_to_bf16x2) and multiplying by 2^120: the same arithmetic here, for every code.
    #[test]
    fn the_kernels_bit_placement_decodes_every_finite_code() {
        let two120 = 2f32.powi(120);
        for b in (0u32..256).filter(|b| b & 0x7f != 0x7f) {
            let want = e4m3_to_f32(b as u8);
            let f = f32::from_bits(((b & 0x7f) << 20) | ((b & 0x80) << 24)) * two120;
            assert_eq!(f.to_bits(), want.to_bits(), "{b:#x}");
            let h = half::bf16::from_bits((((b & 0x7f) << 4) | ((b & 0x80) << 8)) as u16);
            assert_eq!(h.to_f32() * two120, want, "{b:#x}");
            // every value is a bf16: the tile the decode kernel converts holds it exactly
            assert_eq!(half::bf16::from_f32(want).to_f32(), want, "{b:#x}");
        }
    }

    #[test]
    fn layout_pieces_are_aligned_and_deepseek_v2_takes_656_bytes() {
        let l = Fp8Layout::DEEPSEEK_V2;
        assert_eq!(
            (l.pe_offset(), l.scale_offset(), l.row_bytes()),
            (512, 640, 656)
        );
        assert_eq!(Fp8Layout::new(512, 64), Ok(l));
        // the tiny fixtures: latent 32, rope 8
        let t = Fp8Layout::new(32, 8).unwrap_or(l);
        assert_eq!(
            (t.pe_offset(), t.scale_offset(), t.row_bytes()),
            (32, 48, 64)
        );
        for l in [l, t] {
            assert!(l.pe_offset().is_multiple_of(16) && l.row_bytes().is_multiple_of(16));
        }
        assert!(Fp8Layout::new(40, 8).is_err());
        assert!(Fp8Layout::new(32, 4).is_err());
        assert!(Fp8Layout::new(0, 8).is_err());
    }

    #[test]
    fn rows_encode_and_decode() {
        let l = Fp8Layout::new(32, 8).unwrap_or(Fp8Layout::DEEPSEEK_V2);
        let lat: Vec<f32> = (0..32).map(|i| (i as f32 - 15.5) / 7.0).collect();
        let pe: Vec<f32> = (0..8).map(|i| i as f32 * 0.3 - 1.0).collect();
        let row = l.encode(&lat, &pe);
        assert_eq!(row.len(), 64);
        assert!(row[l.scale_offset() + 4..].iter().all(|&b| b == 0));
        let back = l.decode(&row);
        assert_eq!(l.scale(&row), 15.5 / 7.0 / 448.0);
        for (a, b) in lat.iter().zip(&back[..32]) {
            assert!((a - b).abs() <= a.abs() / 16.0 + 1e-6, "{a} {b}");
        }
        for (a, b) in pe.iter().zip(&back[32..]) {
            assert_eq!(half::bf16::from_f32(*a).to_f32(), *b);
        }
    }
}
