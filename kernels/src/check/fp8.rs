//! GPU checks of the FP8 latent cache kernels (mla_fp8.cu) against `crate::fp8`, the CPU
//! quantizer and layout they must reproduce:
//! - the append: bit-exact against the CPU quantizer applied to `mla_latent_append_bf16`'s rows
//!   of the same input (the FP8 cache is by definition the quantization of the bf16 cache), and
//!   within 5e-2 relative L2 of the f32 reference (e4m3 rounding alone: ≈ 2.7 % RMS);
//! - the gather (dequantize to bf16): bit-exact against `bf16(decode(q) · scale)`;
//! - decode: against the f32 reference of MLA decode over the dequantized cache (the same FP8
//!   bytes the kernel reads), relative L2 ≤ 1e-2 as the bf16 kernels' rows: the kernel adds only
//!   the bf16 rounding of P (which carries the scales) to what the reference computes.
//!
//! The random caches have an outlier in some rows (so most of their codes are small, subnormals
//! included) and an all-zero row (scale 0).

use super::BlockLayout;
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{CheckRow, f32s, rand_bf16};
use crate::device::Gpu;
use crate::error::Result;
use crate::fp8::Fp8Layout;
use crate::ops::general::{self as g, LatentRope};
use crate::ops::{mla, mla_fp8};
use crate::reference as r;
use crate::rope::YarnConfig;
use crate::tensor::Tensor;

/// Host FP8 cache rows for `slots` tokens of random latents (uniform in [-1, 1); every 37th row
/// with one value 300 times larger, row 5 all zeros) and k_pe: (bytes, dequantized values
/// [slots, r + dr]).
pub fn random_cache(g: &mut ChaCha8Rng, l: Fp8Layout, slots: usize) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::with_capacity(slots * l.row_bytes());
    let mut vals = Vec::with_capacity(slots * (l.kv_lora + l.rope));
    for s in 0..slots {
        let mut lat: Vec<f32> = (0..l.kv_lora)
            .map(|_| g.random_range(-1.0f32..1.0))
            .collect();
        if s % 37 == 3 {
            let i = g.random_range(0..l.kv_lora);
            lat[i] *= 300.0;
        }
        if s == 5 {
            lat.fill(0.0);
        }
        let pe: Vec<f32> = (0..l.rope).map(|_| g.random_range(-1.0f32..1.0)).collect();
        let row = l.encode(&lat, &pe);
        vals.extend(l.decode(&row));
        bytes.extend(row);
    }
    (bytes, vals)
}

/// `mla_latent_append_fp8` of `tokens` rows into shuffled slots (one left out as -1), beside
/// `mla_latent_append_bf16` of the same rows.
pub fn check_latent_append_fp8(
    gpu: &Gpu,
    tokens: usize,
    kv_lora: usize,
    rope: usize,
    rotate: bool,
) -> Result<CheckRow> {
    const OP: &str = "mla_latent_append_fp8";
    let l = Fp8Layout::new(kv_lora, rope).map_err(|e| crate::error::shape_err(OP, e))?;
    let mut rg = ChaCha8Rng::seed_from_u64(23);
    let width = kv_lora + rope;
    let (kb, kf) = rand_bf16(&mut rg, tokens * width, 2.0);
    let (wb, wf) = rand_bf16(&mut rg, kv_lora, 1.5);
    let (slots, block, nblocks) = crate::ops::general::append_slots(&mut rg, tokens);
    let kva = Tensor::from_host(gpu, &kb, &[tokens, width])?;
    let w = Tensor::from_host(gpu, &wb, &[kv_lora])?;
    let st = Tensor::from_host(gpu, &slots, &[tokens])?;
    let mut c16 = Tensor::<bf16>::zeros(gpu, &[nblocks, block, width])?;
    let mut c8 = Tensor::<u8>::zeros(gpu, &[nblocks, block, l.row_bytes()])?;
    let eps = 1e-6;
    let max_pos = 4096;
    let positions: Vec<i32> = (0..tokens)
        .map(|_| rg.random_range(0..max_pos as i32))
        .collect();
    let (cos, sin) = crate::rope::yarn_cos_sin(
        &YarnConfig {
            dim: rope,
            ..YarnConfig::deepseek_v2()
        },
        max_pos,
    );
    let table = crate::rope::RopeTable::from_host(gpu, &cos, &sin, max_pos, rope)?;
    let pt = Tensor::from_host(gpu, &positions, &[tokens])?;
    let rope_arg = || {
        rotate.then(|| LatentRope {
            positions: pt.view(),
            table: &table,
            q: None,
        })
    };
    g::mla_latent_append(
        gpu,
        g::LatentAppendParams {
            kva: kva.view(),
            norm_w: w.view(),
            slots: st.view(),
            cache: c16.view_mut(),
            kv_lora,
            eps,
            rope: rope_arg(),
            absorb: None,
        },
    )?;
    mla_fp8::mla_latent_append_fp8(
        gpu,
        mla_fp8::LatentAppendFp8Params {
            kva: kva.view(),
            norm_w: w.view(),
            slots: st.view(),
            cache: c8.view_mut(),
            layout: l,
            eps,
            rope: rope_arg(),
        },
    )?;
    let got = c8.to_host(gpu)?;
    let rows16 = f32s(&c16.to_host(gpu)?);
    // exact: the CPU quantizer of the bf16 kernel's rows (unwritten slots stay zero)
    let mut want = vec![0u8; got.len()];
    for &s in slots.iter().filter(|&&s| s >= 0) {
        let s = s as usize;
        let src = &rows16[s * width..(s + 1) * width];
        want[s * l.row_bytes()..(s + 1) * l.row_bytes()]
            .copy_from_slice(&l.encode(&src[..kv_lora], &src[kv_lora..]));
    }
    let mut row = CheckRow::exact(
        OP,
        format!(
            "tokens {tokens} latent {kv_lora}+{rope}{}",
            if rotate { " with rope" } else { "" }
        ),
        &got,
        &want,
    );
    // and against the f32 reference: rmsnorm (and rope) in f32, then the FP8 round trip's error
    let mut kf = kf;
    if rotate {
        let mut rows = kf.clone();
        r::rope(&mut rows, 1, width, kv_lora, rope, &positions, &cos, &sin);
        kf = rows;
    }
    let (mut gv, mut wv) = (Vec::new(), Vec::new());
    for (t, &s) in slots.iter().enumerate() {
        if s < 0 {
            continue;
        }
        let s = s as usize;
        gv.extend(l.decode(&got[s * l.row_bytes()..(s + 1) * l.row_bytes()]));
        let src = &kf[t * width..(t + 1) * width];
        wv.extend(r::rmsnorm(&src[..kv_lora], &wf, eps));
        wv.extend_from_slice(&src[kv_lora..]);
    }
    let (max_abs, rel_l2) = r::errors(&gv, &wv);
    row.max_abs = max_abs;
    row.rel_l2 = rel_l2;
    row.tol = 5e-2;
    row.pass = row.pass && rel_l2 <= row.tol;
    row.note = format!("bytes vs CPU quantizer of the bf16 append: {}", row.note);
    Ok(row)
}

/// `gather_slots_fp8` of `n` shuffled slots of a random FP8 cache.
pub fn check_gather_fp8(gpu: &Gpu, n: usize, kv_lora: usize, rope: usize) -> Result<CheckRow> {
    const OP: &str = "mla_gather_fp8";
    let l = Fp8Layout::new(kv_lora, rope).map_err(|e| crate::error::shape_err(OP, e))?;
    let mut rg = ChaCha8Rng::seed_from_u64(24);
    let (bs, nblocks) = (16usize, n.div_ceil(16) + 2);
    let (bytes, vals) = random_cache(&mut rg, l, nblocks * bs);
    let mut slots: Vec<i32> = (0..(nblocks * bs) as i32).collect();
    for i in (1..slots.len()).rev() {
        let j = rg.random_range(0..=i);
        slots.swap(i, j);
    }
    slots.truncate(n);
    let width = kv_lora + rope;
    let cache = Tensor::from_host(gpu, &bytes, &[nblocks, bs, l.row_bytes()])?;
    let st = Tensor::from_host(gpu, &slots, &[n])?;
    let mut out = Tensor::<bf16>::zeros(gpu, &[n, width])?;
    mla_fp8::gather_slots_fp8(
        gpu,
        mla_fp8::GatherFp8Params {
            cache: cache.view(),
            layout: l,
            slots: st.view(),
            out: out.view_mut(),
        },
    )?;
    let want: Vec<u16> = slots
        .iter()
        .flat_map(|&s| vals[s as usize * width..(s as usize + 1) * width].iter())
        .map(|&v| bf16::from_f32(v).to_bits())
        .collect();
    let got: Vec<u16> = out.to_host(gpu)?.iter().map(|v| v.to_bits()).collect();
    Ok(CheckRow::exact(
        OP,
        format!("rows {n} latent {kv_lora}+{rope}"),
        &got,
        &want,
    ))
}

/// An FP8 decode kernel over a random FP8 cache with its blocks laid out as `layout` says
/// (shuffled, or in runs), against the f32 reference of MLA decode over the dequantized cache.
pub fn check_mla_decode_fp8(
    gpu: &Gpu,
    kernel: mla::Fp8Kernel,
    lens: &[usize],
    heads: usize,
    block_size: usize,
    splits: Option<usize>,
    layout: BlockLayout,
) -> Result<CheckRow> {
    let l = Fp8Layout::DEEPSEEK_V2;
    let mut rg = ChaCha8Rng::seed_from_u64(25);
    let batch = lens.len();
    let c = super::DecodeCase::new(gpu, &mut rg, lens, heads, block_size, layout)?;
    let max_len = c.max_len;
    let (bytes, vals) = random_cache(&mut rg, l, c.num_blocks * block_size);
    let cache = Tensor::from_host(gpu, &bytes, &[c.num_blocks, block_size, l.row_bytes()])?;
    let mut out = Tensor::<bf16>::zeros(gpu, &[batch, heads, mla::KV_LORA])?;
    mla::mla_decode_fp8(
        gpu,
        mla::MlaDecodeFp8Params {
            q_abs: c.q_abs.view(),
            q_pe: c.q_pe()?,
            cache: cache.view(),
            block_table: c.block_table.view(),
            seq_lens: c.seq_lens.view(),
            out: out.view_mut(),
            max_seq_len: max_len,
            scale: c.scale,
            splits,
            uv: None,
            kernel: Some(kernel),
        },
    )?;
    let got = f32s(&out.to_host(gpu)?);
    let want = c.reference(&vals, block_size, heads);
    let used = splits.unwrap_or_else(|| {
        mla::choose_splits(gpu.sm_count, batch, heads, max_len, mla::MlaKernel::Wgmma)
    });
    let lens_s = if lens.len() <= 8 {
        format!("{lens:?}")
    } else {
        format!("{} seqs, max {max_len}", lens.len())
    };
    let mut row = CheckRow::cmp(
        kernel.function(),
        format!(
            "lens {lens_s} heads {heads} block {block_size}{}",
            layout.label()
        ),
        &got,
        &want,
        1e-2,
    );
    row.note = format!("splits {used}; vs f32 over the dequantized cache");
    Ok(row)
}

/// The FP8 rows of `dsv2-gpu-check` (`--fp8`, and the end of `--mla` and of a full run): the
/// append and the gather, then decode with each FP8 kernel over issue 20's lengths (1, 7, 67,
/// 130, 5137), 128, 100 and 16 heads, cache blocks of 16, 64 and 128 tokens, forced and empty
/// splits. Each decode row
/// prints as it is taken (a kernel that crashes the context leaves the rows before it).
pub fn run_fp8(gpu: &Gpu) -> Result<Vec<CheckRow>> {
    let mut out = vec![
        check_latent_append_fp8(gpu, 67, 512, 64, false)?,
        check_latent_append_fp8(gpu, 67, 512, 64, true)?,
        check_latent_append_fp8(gpu, 7, 32, 8, true)?,
        check_latent_append_fp8(gpu, 1, 512, 64, true)?,
        check_gather_fp8(gpu, 67, 512, 64)?,
        check_gather_fp8(gpu, 5137, 512, 64)?,
        check_gather_fp8(gpu, 7, 32, 8)?,
    ];
    // (context lengths, heads, block size, forced splits)
    let cases: [(&[usize], usize, usize, Option<usize>); 13] = [
        (&[1], 128, 64, None),
        (&[7, 1, 67, 130], 128, 64, None),
        (&[5137, 33, 1], 128, 64, None),
        (&[5137, 33, 1], 128, 64, Some(1)),
        (&[5137, 33, 1], 128, 64, Some(3)),
        (&[5137, 33, 1], 128, 16, None),
        (&[67, 300, 7], 16, 16, None),
        (&[7, 1, 67, 130], 16, 64, None),
        (&[64, 65, 63, 128], 100, 64, None),
        (&[130, 5137], 100, 16, None),
        // more splits than a sequence has tiles: empty splits write only their -inf lse
        (&[1, 2, 100], 128, 16, Some(64)),
        (&[2000, 1, 129], 128, 16, Some(200)),
        (&[300, 1000, 17], 128, 128, None),
    ];
    // (the turn-taking form last: a new kernel's crash leaves the rows above printed)
    for kernel in [
        mla::Fp8Kernel::Wgmma,
        mla::Fp8Kernel::Regs,
        mla::Fp8Kernel::Pp,
    ] {
        for (lens, heads, block, splits) in cases {
            let row = check_mla_decode_fp8(
                gpu,
                kernel,
                lens,
                heads,
                block,
                splits,
                BlockLayout::Shuffled,
            )?;
            row.eprint_progress();
            out.push(row);
        }
    }
    // blocks in runs (the register kernels' one-box copies of a whole tile, and their pieces)
    for kernel in [mla::Fp8Kernel::Regs, mla::Fp8Kernel::Pp] {
        for (lens, heads, block, splits) in [
            (&[5137usize, 33, 1][..], 128, 16, None),
            (&[300, 1000, 17][..], 16, 8, Some(3)),
        ] {
            let row =
                check_mla_decode_fp8(gpu, kernel, lens, heads, block, splits, BlockLayout::Runs)?;
            row.eprint_progress();
            out.push(row);
        }
    }
    Ok(out)
}
