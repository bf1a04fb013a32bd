//! dsv2-gpu-check: runs every kernel against its CPU reference on the GPU and prints a table, then
//! measures copy bandwidth, cuBLAS bf16 GEMM, MLA decode (P1), MLA prefill attention (PF) and the
//! expert FFN (P2) beside those ceilings. Exits non-zero on any FAIL.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use cudarc::driver::sys::CUevent_flags;
use half::bf16;

use dsv2_kernels::check;
use dsv2_kernels::compile::{self, CompileConfig};
use dsv2_kernels::ops::{elementwise as ew, expert, gemm, gemv, mla, moe};
use dsv2_kernels::{Gpu, GpuOptions, Tensor};

struct Args {
    quick: bool,
    mla_only: bool,
    gemv_only: bool,
    grouped_only: bool,
    /// Only the FP8 latent cache's checks and its P1 rows beside the bf16 kernel (`--fp8`).
    fp8_only: bool,
    /// Only the tensor-core throughput probes (`--probe`).
    probe_only: bool,
    no_bench: bool,
    no_check: bool,
    compile_only: bool,
    /// MLA decode kernels to check and time (`--mla-kernels`; default all).
    mla_kernels: Vec<mla::MlaKernel>,
    opts: GpuOptions,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        quick: false,
        mla_only: false,
        gemv_only: false,
        grouped_only: false,
        fp8_only: false,
        probe_only: false,
        no_bench: false,
        no_check: false,
        compile_only: false,
        mla_kernels: vec![
            mla::MlaKernel::Wgmma,
            mla::MlaKernel::Mma,
            mla::MlaKernel::Seesaw,
            mla::MlaKernel::Tma,
            mla::MlaKernel::TmaPair,
            mla::MlaKernel::Roles,
            mla::MlaKernel::Narrow,
            mla::MlaKernel::NarrowRs,
        ],
        opts: GpuOptions::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--mla" => a.mla_only = true,
            "--gemv" => a.gemv_only = true,
            "--grouped" => a.grouped_only = true,
            "--fp8" => a.fp8_only = true,
            "--probe" => a.probe_only = true,
            "--no-bench" => a.no_bench = true,
            "--no-check" => a.no_check = true,
            "--compile-only" => a.compile_only = true,
            "--no-cache" => a.opts.no_cache = true,
            "--mla-kernels" => {
                let list = it
                    .next()
                    .context("--mla-kernels needs a list, e.g. seesaw,wgmma")?;
                a.mla_kernels = list
                    .split(',')
                    .map(mla::MlaKernel::parse)
                    .collect::<std::result::Result<_, _>>()?;
            }
            "--cache-dir" => {
                a.opts.cache_dir = Some(it.next().context("--cache-dir needs a path")?.into())
            }
            "--device" => {
                let d = it.next().context("--device needs cuda:N")?;
                let n = d.strip_prefix("cuda:").unwrap_or(&d);
                a.opts.ordinal = n.parse().with_context(|| format!("bad device {d}"))?;
            }
            "-h" | "--help" => {
                println!(
                    "dsv2-gpu-check [--quick] [--mla] [--mla-kernels LIST] [--gemv] [--grouped] [--fp8] [--probe] [--no-bench] [--no-check] [--compile-only] [--no-cache] [--cache-dir DIR] [--device cuda:N]\n\n\
                     Checks every kernel against the CPU reference, then measures the ceilings (copy\n\
                     bandwidth, cuBLAS) and P1/P2. --mla: only the MLA checks (decode, both kernels;\n\
                     prefill: wgmma, wgmma persistent, M128, M64), P1 and PF, a quick go/no-go for the\n\
                     wgmma kernels.\n\
                     --mla-kernels: which MLA decode kernels --mla checks and times (comma-separated:\n\
                     wgmma, mma, seesaw, tma, tma-pair, roles, narrow, narrow-rs; default all, a new kernel last\n\
                     so that a crash of it leaves the others' rows printed).\n\
                     --gemv: only the few-row GEMV checks and their timings beside cuBLAS and copy.\n\
                     --grouped: only the grouped expert checks (every row tile, the warp-specialised\n\
                     one at awkward per-expert counts), then P2, P2g per tile and the decode rows.\n\
                     --fp8: only the FP8 latent cache's checks (append, gather, decode with both FP8 kernels)\n\
                     and its P1 rows beside the bf16 decode kernel (64 heads x batch 128, 128 heads x batch 64,\n\
                     ctx 4096).\n\
                     --probe: no checks; the tensor-core rate of the MMA shapes and wait patterns the\n\
                     MLA decode and grouped expert kernels use, operands in shared memory, beside cuBLAS;\n\
                     then how fast MLA cache tiles stream in with 1-3 tile buffers and no math.\n\
                     --no-check: skip the checks, only the measurements (so that a profiler's first\n\
                     launches of a kernel are the timed ones)."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

/// Time `f` over `iters` runs on the GPU's stream with CUDA events, after `warm` warm-ups; ms/run.
fn time_ms(gpu: &Gpu, warm: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warm {
        f()?;
    }
    gpu.sync()?;
    let start = gpu
        .stream
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    for _ in 0..iters {
        f()?;
    }
    let end = gpu
        .stream
        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    end.synchronize()?;
    Ok(start.elapsed_ms(&end)? as f64 / iters as f64)
}

fn fill(gpu: &Gpu, t: &mut Tensor<bf16>, seed: u64, scale: f32) -> Result<()> {
    ew::fill_uniform(gpu, t.view_mut(), seed, scale)?;
    Ok(())
}

/// P1-FP8 rows (issue 20): MLA decode over the FP8 latent cache (`mla_decode_fp8`, 656 bytes a
/// token) beside the bf16 kernel (`DSV2_MLA_KERNEL`, default wgmma; 1152 bytes a token) on the
/// same shapes, ctx 4096, cache blocks of 64 interleaved between sequences as in P1: 64 heads x
/// batch 128 (bytes bind: issue 20 wants fp8 >= 1.6x the bf16 tokens/s) and 128 heads x batch 64
/// (issue 20 wants >= 0.8 of fp8's own binding roofline). Each row prints time, bytes, FLOPs
/// (the bf16 tensor-core math both kernels do: 2·H·(576 + 512) per token), both ceilings'
/// times and the ratio to the binding one; then the fp8 / bf16 tokens/s ratio. The FP8 cache is
/// written by the FP8 append kernel from uniform random latents.
fn bench_fp8(gpu: &Gpu, copy_gbs: f64, blas_tflops: f64) -> Result<()> {
    use dsv2_kernels::fp8::Fp8Layout;
    use dsv2_kernels::ops::mla_fp8;
    let l = Fp8Layout::DEEPSEEK_V2;
    for (batch, ctx, heads) in [
        (128usize, 4096usize, 64usize),
        (64, 4096, 128),
        (1, 32768, 128),
    ] {
        let bs = 64usize;
        let bf16_kernel = mla::MlaKernel::from_env_for(heads, bs)?;
        let blocks_per = ctx / bs;
        let nblocks = batch * blocks_per;
        let tokens = nblocks * bs;
        let mut c16 = Tensor::<bf16>::zeros(gpu, &[nblocks, bs, mla::CACHE_DIM])?;
        fill(gpu, &mut c16, 3, 1.0)?;
        let mut c8 = Tensor::<u8>::zeros(gpu, &[nblocks, bs, l.row_bytes()])?;
        // the FP8 cache from random latents, 64K tokens per append (no rope, unit norm weight)
        let chunk = 65536usize;
        let mut kva = Tensor::<bf16>::zeros(gpu, &[chunk, mla::CACHE_DIM])?;
        fill(gpu, &mut kva, 6, 1.0)?;
        let ones = Tensor::from_host(gpu, &vec![bf16::ONE; mla::KV_LORA], &[mla::KV_LORA])?;
        for c0 in (0..tokens).step_by(chunk) {
            let n = chunk.min(tokens - c0);
            let slots: Vec<i64> = (c0..c0 + n).map(|s| s as i64).collect();
            let st = Tensor::from_host(gpu, &slots, &[n])?;
            mla_fp8::mla_latent_append_fp8(
                gpu,
                mla_fp8::LatentAppendFp8Params {
                    kva: kva.view().narrow(0, 0, n)?,
                    norm_w: ones.view(),
                    slots: st.view(),
                    cache: c8.view_mut(),
                    layout: l,
                    eps: 1e-6,
                    rope: None,
                },
            )?;
        }
        let mut qa = Tensor::<bf16>::zeros(gpu, &[batch, heads, mla::KV_LORA])?;
        let mut qp = Tensor::<bf16>::zeros(gpu, &[batch, heads, mla::ROPE])?;
        fill(gpu, &mut qa, 4, 0.1)?;
        fill(gpu, &mut qp, 5, 0.1)?;
        let table: Vec<i32> = (0..batch * blocks_per)
            .map(|i| ((i % blocks_per) * batch + i / blocks_per) as i32)
            .collect();
        let bt = Tensor::from_host(gpu, &table, &[batch, blocks_per])?;
        let sl = Tensor::from_host(gpu, &vec![ctx as i32; batch], &[batch])?;
        let mut out = Tensor::<bf16>::zeros(gpu, &[batch, heads, mla::KV_LORA])?;
        let ms16 = time_ms(gpu, 3, 20, || {
            mla::mla_decode(
                gpu,
                mla::MlaDecodeParams {
                    q_abs: qa.view(),
                    q_pe: qp.view(),
                    cache: c16.view(),
                    block_table: bt.view(),
                    seq_lens: sl.view(),
                    out: out.view_mut(),
                    max_seq_len: ctx,
                    scale: 0.1,
                    splits: None,
                    kernel: Some(bf16_kernel),
                    uv: None,
                },
            )?;
            Ok(())
        })?;
        let mut fp8_ms = Vec::new();
        for kernel in [
            mla::Fp8Kernel::Wgmma,
            mla::Fp8Kernel::Regs,
            mla::Fp8Kernel::Pp,
        ] {
            let ms = time_ms(gpu, 3, 20, || {
                mla::mla_decode_fp8(
                    gpu,
                    mla::MlaDecodeFp8Params {
                        q_abs: qa.view(),
                        q_pe: qp.view(),
                        cache: c8.view(),
                        block_table: bt.view(),
                        seq_lens: sl.view(),
                        out: out.view_mut(),
                        max_seq_len: ctx,
                        scale: 0.1,
                        splits: None,
                        uv: None,
                        kernel: Some(kernel),
                    },
                )?;
                Ok(())
            })?;
            fp8_ms.push((kernel, ms));
        }
        let flops = 2.0 * (batch * ctx * heads) as f64 * (mla::CACHE_DIM + mla::KV_LORA) as f64;
        let t_flops = flops / (blas_tflops * 1e12);
        let splits = mla::choose_splits(gpu.sm_count, batch, heads, ctx, mla::MlaKernel::Wgmma);
        let rows = std::iter::once((format!("{bf16_kernel:?} bf16"), ms16, mla::CACHE_DIM * 2))
            .chain(
                fp8_ms
                    .iter()
                    .map(|&(k, ms)| (format!("fp8 {}", k.function()), ms, l.row_bytes())),
            );
        for (name, ms, row_bytes) in rows {
            let bytes = (batch * ctx * row_bytes) as f64;
            let t_bytes = bytes / (copy_gbs * 1e9);
            let roof_ms = t_bytes.max(t_flops) * 1e3;
            println!(
                "P1-FP8 MLA decode ({name}) batch {batch} ctx {ctx} heads {heads}: {ms:.3} ms, {:.1} MB, {:.1} GFLOP; ceilings: bytes {:.3} ms at {copy_gbs:.0} GB/s, FLOPs {:.3} ms at {blas_tflops:.0} TFLOP/s; roofline {roof_ms:.3} ms ({} bound), {:.3} of it; cache read {:.0} GB/s; splits {splits}",
                bytes / 1e6,
                flops / 1e9,
                t_bytes * 1e3,
                t_flops * 1e3,
                if t_bytes >= t_flops { "bytes" } else { "FLOPs" },
                roof_ms / ms,
                bytes / (ms * 1e-3) / 1e9,
            );
        }
        for (k, ms8) in &fp8_ms {
            println!(
                "P1-FP8 batch {batch} ctx {ctx} heads {heads}: fp8 ({}) / bf16 tokens/s = {:.2}x",
                k.function(),
                ms16 / ms8
            );
        }
    }
    Ok(())
}

/// PF rows (issue 20): MLA prefill attention alone at 128 heads, the whole decompressed path
/// (one gather of every sequence's latent context, one K/V GEMM, one `mla_prefill` launch of the
/// default kernel) and the attention kernel alone for each kernel and tile (wgmma, mma.sync M128
/// and M64), for 64 x 512 tokens, 1 x 4096, and one 512-token
/// chunk over a 3584-token cached prefix. FLOPs: causal (query, key) pairs x H x (2·192 + 2·128)
/// for the attention, plus 2 · 512 · H · 256 per context token for the K/V GEMM; the ratio is to
/// the cuBLAS bf16 rate measured in this run. For 64 x 512 also the old per-sequence path (slot
/// upload, gather, GEMM and the general causal kernel per sequence), for the before / after.
fn bench_prefill(gpu: &Gpu, blas_tflops: f64) -> Result<()> {
    use dsv2_kernels::ops::general as g;
    use dsv2_kernels::ops::mla_prefill::{self as pf, PrefillPlan, PrefillSeq, PrefillTile};
    let heads = 128usize;
    let (dqk, kvw, bs) = (pf::QK_NOPE + pf::QK_ROPE, pf::QK_NOPE + pf::V_HEAD, 64usize);
    let scale = 0.1352f32; // DeepSeek-V2's YaRN softmax scale at 192 dims, roughly
    let mut kv_b = Tensor::<bf16>::zeros(gpu, &[heads * kvw, mla::KV_LORA])?;
    fill(gpu, &mut kv_b, 11, 0.05)?;
    for (name, count, len, pos0) in [
        ("64 x 512", 64usize, 512usize, 0usize),
        ("1 x 4096", 1, 4096, 0),
        ("512 over 3584 cached", 1, 512, 3584),
    ] {
        let ctx = pos0 + len;
        let (n, t) = (count * len, count * ctx);
        let blocks_per = ctx.div_ceil(bs);
        let mut cache = Tensor::<bf16>::zeros(gpu, &[count * blocks_per, bs, mla::CACHE_DIM])?;
        fill(gpu, &mut cache, 12, 1.0)?;
        let mut q = Tensor::<bf16>::zeros(gpu, &[n, heads, dqk])?;
        fill(gpu, &mut q, 13, 1.0)?;
        // blocks of different sequences interleaved, as a running server's allocator leaves them
        let block = |s: usize, j: usize| j * count + s;
        let mut slots = Vec::with_capacity(t);
        let mut specs = Vec::with_capacity(count);
        for s in 0..count {
            specs.push(PrefillSeq {
                q_row0: s * len,
                q_len: len,
                pos0,
                ctx_row0: slots.len(),
            });
            slots.extend((0..ctx).map(|p| (block(s, p / bs) * bs + p % bs) as i32));
        }
        let st = Tensor::from_host(gpu, &slots, &[t])?;
        let mut lat = Tensor::<bf16>::zeros(gpu, &[t, mla::CACHE_DIM])?;
        let mut kv = Tensor::<bf16>::zeros(gpu, &[t, heads, kvw])?;
        let mut out = Tensor::<bf16>::zeros(gpu, &[n, heads, pf::V_HEAD])?;
        // a plan with its descriptors and tiles on the device (uploaded once, outside the timing)
        let upload = |plan: PrefillPlan| -> Result<(PrefillPlan, Tensor<i32>, Tensor<i32>)> {
            let sd = Tensor::from_host(gpu, &plan.seqs, &[plan.n_seqs(), 4])?;
            let td = Tensor::from_host(gpu, &plan.tiles, &[plan.n_tiles(), 2])?;
            Ok((plan, sd, td))
        };
        let auto = upload(PrefillPlan::new(&specs, None)?)?;
        let pairs = auto.0.pairs as f64;
        let attn_flops = pairs * heads as f64 * (2 * dqk + 2 * pf::V_HEAD) as f64;
        let dec_flops = 2.0 * (mla::KV_LORA * heads * kvw) as f64 * t as f64;
        let flash = |(plan, sd, td): &(PrefillPlan, Tensor<i32>, Tensor<i32>),
                     lat: &Tensor<bf16>,
                     kv: &Tensor<bf16>,
                     out: &mut Tensor<bf16>|
         -> Result<()> {
            pf::mla_prefill(
                gpu,
                pf::MlaPrefillParams {
                    q: q.view(),
                    k_nope: kv.view().narrow(2, 0, pf::QK_NOPE)?,
                    k_pe: lat.view().narrow(1, mla::KV_LORA, pf::QK_ROPE)?,
                    v: kv.view().narrow(2, pf::QK_NOPE, pf::V_HEAD)?,
                    out: out.view_mut(),
                    plan,
                    seqs: sd.view(),
                    tiles: td.view(),
                    scale,
                },
            )?;
            Ok(())
        };
        let ms_all = time_ms(gpu, 2, 10, || {
            g::gather_slots(
                gpu,
                g::GatherSlotsParams {
                    cache: cache.view(),
                    slots: st.view(),
                    out: lat.view_mut(),
                },
            )?;
            pf::decompress_kv(
                gpu,
                pf::DecompressParams {
                    lat: lat.view(),
                    kv_lora: mla::KV_LORA,
                    kv_b: kv_b.view(),
                    kv: kv.view_mut(),
                },
            )?;
            flash(&auto, &lat, &kv, &mut out)
        })?;
        let tf = |flops: f64, ms: f64| flops / (ms * 1e-3) / 1e12;
        println!(
            "PF prefill attention {name}, heads {heads}: gather + K/V GEMM + flash ({:?}) {ms_all:.3} ms for {:.1} GFLOP ({:.1} attention + {:.1} K/V GEMM), {:.0} TFLOP/s = {:.3} of cuBLAS",
            auto.0.tile,
            (attn_flops + dec_flops) / 1e9,
            attn_flops / 1e9,
            dec_flops / 1e9,
            tf(attn_flops + dec_flops, ms_all),
            tf(attn_flops + dec_flops, ms_all) / blas_tflops
        );
        for tile in [
            PrefillTile::Wgmma128,
            PrefillTile::M128,
            PrefillTile::M64,
            // new last: a crash of it leaves the other rows printed
            PrefillTile::Wgmma128Persist,
            PrefillTile::Ws128,
        ] {
            let plan = upload(PrefillPlan::new(&specs, Some(tile))?)?;
            let ms = time_ms(gpu, 2, 10, || flash(&plan, &lat, &kv, &mut out))?;
            println!(
                "PF   flash alone {name} ({tile:?}, {} CTAs): {ms:.3} ms, {:.0} TFLOP/s = {:.3} of cuBLAS",
                plan.0.n_tiles() * heads,
                tf(attn_flops, ms),
                tf(attn_flops, ms) / blas_tflops
            );
        }
        if count == 64 {
            // the old path: per sequence, its slots uploaded, gathered, decompressed, attended
            let ms_old = time_ms(gpu, 1, 2, || {
                for s in 0..count {
                    let st = Tensor::from_host(gpu, &slots[s * ctx..(s + 1) * ctx], &[ctx])?;
                    let mut lat = Tensor::<bf16>::zeros(gpu, &[ctx, mla::CACHE_DIM])?;
                    g::gather_slots(
                        gpu,
                        g::GatherSlotsParams {
                            cache: cache.view(),
                            slots: st.view(),
                            out: lat.view_mut(),
                        },
                    )?;
                    let mut kv = Tensor::<bf16>::zeros(gpu, &[ctx, heads, kvw])?;
                    pf::decompress_kv(
                        gpu,
                        pf::DecompressParams {
                            lat: lat.view(),
                            kv_lora: mla::KV_LORA,
                            kv_b: kv_b.view(),
                            kv: kv.view_mut(),
                        },
                    )?;
                    let rows = s * len;
                    g::mla_attn_causal(
                        gpu,
                        g::AttnCausalParams {
                            q1: q.view().narrow(0, rows, len)?.narrow(2, 0, pf::QK_NOPE)?,
                            q2: q.view().narrow(0, rows, len)?.narrow(
                                2,
                                pf::QK_NOPE,
                                pf::QK_ROPE,
                            )?,
                            k1: kv.view().narrow(2, 0, pf::QK_NOPE)?,
                            k2: lat.view().narrow(1, mla::KV_LORA, pf::QK_ROPE)?,
                            v: kv.view().narrow(2, pf::QK_NOPE, pf::V_HEAD)?,
                            out: out.view_mut().narrow(0, rows, len)?,
                            pos0,
                            scale,
                        },
                    )?;
                }
                Ok(())
            })?;
            println!(
                "PF   old per-sequence path {name}: {ms_old:.3} ms, {:.1} TFLOP/s; the new path is {:.1}x faster",
                tf(attn_flops + dec_flops, ms_old),
                ms_old / ms_all
            );
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if args.compile_only {
        let cfg = CompileConfig {
            arch: compile::DEFAULT_ARCH.into(),
            include_dir: compile::find_cuda_include(None)?,
            cache_dir: None,
            driver_version: 0,
        };
        for (file, src) in compile::SOURCES {
            let t = Instant::now();
            let cubin = compile::compile_cubin(&cfg, file, src)?;
            println!(
                "{file}: {} bytes of CUBIN in {:.2} s",
                cubin.len(),
                t.elapsed().as_secs_f64()
            );
        }
        return Ok(());
    }
    let t_open = Instant::now();
    let gpu = Gpu::open(&args.opts)?;
    println!(
        "device: {} ({} SMs), driver API {}, NVRTC {:?}; kernels ready in {:.2} s ({})",
        gpu.name,
        gpu.sm_count,
        gpu.driver_version,
        compile::nvrtc_version()?,
        t_open.elapsed().as_secs_f64(),
        gpu.module_sources
            .iter()
            .map(|(f, s)| format!("{f}: {s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // a second open shows the cache path (CUBIN load only)
    let t2 = Instant::now();
    let again = Gpu::open(&args.opts)?;
    println!(
        "second open: {:.3} s ({:?})",
        t2.elapsed().as_secs_f64(),
        again.module_sources.iter().map(|x| x.1).collect::<Vec<_>>()
    );
    drop(again);

    let t_check = Instant::now();
    let rows = if args.probe_only || args.no_check {
        Vec::new()
    } else if args.mla_only {
        check::run_mla(&gpu, &args.mla_kernels)?
    } else if args.gemv_only {
        check::run_gemv(&gpu)?
    } else if args.grouped_only {
        check::run_grouped(&gpu, args.quick)?
    } else if args.fp8_only {
        check::fp8::run_fp8(&gpu)?
    } else {
        check::run_all(&gpu, args.quick)?
    };
    check::print_table(&rows);
    let fails = rows.iter().filter(|r| !r.pass).count();
    println!(
        "checks: {} rows, {} FAIL, {:.1} s",
        rows.len(),
        fails,
        t_check.elapsed().as_secs_f64()
    );

    if !args.no_bench {
        if args.gemv_only {
            println!(
                "\n== measurements (CUDA events; each beside a ceiling measured in this run) =="
            );
            let copy_gbs = copy_ceiling(&gpu)?;
            bench_gemv(&gpu, copy_gbs)?;
        } else if args.grouped_only {
            println!(
                "\n== measurements (CUDA events; each beside a ceiling measured in this run) =="
            );
            let copy_gbs = copy_ceiling(&gpu)?;
            let blas_tflops = blas_ceiling(&gpu)?;
            bench_p2(&gpu, copy_gbs, blas_tflops)?;
        } else if args.probe_only {
            let copy_gbs = copy_ceiling(&gpu)?;
            let blas_tflops = blas_ceiling(&gpu)?;
            bench_probes(&gpu, blas_tflops)?;
            bench_stream_probes(&gpu, copy_gbs)?;
        } else if args.fp8_only {
            println!(
                "\n== measurements (CUDA events; each beside a ceiling measured in this run) =="
            );
            let copy_gbs = copy_ceiling(&gpu)?;
            let blas_tflops = blas_ceiling(&gpu)?;
            bench_fp8(&gpu, copy_gbs, blas_tflops)?;
        } else {
            bench(&gpu, args.mla_only, &args.mla_kernels)?;
        }
    }
    if fails > 0 {
        bail!("{fails} check(s) failed");
    }
    Ok(())
}

/// Ceiling 1: device-to-device copy of 1 GiB, GB/s counting bytes read + written.
fn copy_ceiling(gpu: &Gpu) -> Result<f64> {
    let n = 1usize << 29; // bf16 elements = 1 GiB
    let src = Tensor::<bf16>::zeros(gpu, &[n])?;
    let mut dst = Tensor::<bf16>::zeros(gpu, &[n])?;
    let ms = time_ms(gpu, 2, 10, || {
        gpu.stream.memcpy_dtod(src.buf(), dst.buf_mut())?;
        Ok(())
    })?;
    let copy_gbs = 2.0 * (n * 2) as f64 / (ms * 1e-3) / 1e9;
    println!("copy d2d 1 GiB: {ms:.3} ms, {copy_gbs:.0} GB/s (read + write)");
    Ok(copy_gbs)
}

/// G rows (issue 19): the few-row projections of a decode step at DeepSeek-V2 and V2-Lite shapes,
/// GEMV kernel vs cuBLAS, each beside its roofline (weight + activation bytes / copy bandwidth;
/// FLOPs are negligible at <= 8 rows).
fn bench_gemv(gpu: &Gpu, copy_gbs: f64) -> Result<()> {
    use gemm::Gemm;
    // (label, n, k, batch, w_nk, f32 out)
    let shapes: [(&str, usize, usize, usize, bool, bool); 14] = [
        ("V2 q_a", 1536, 5120, 1, true, false),
        ("V2 kv_a", 576, 5120, 1, true, false),
        ("V2 q_b", 24576, 1536, 1, true, false),
        ("V2 absorb W_UK x128", 512, 128, 128, false, false),
        ("V2 W_UV x128", 128, 512, 128, true, false),
        ("V2 o_proj", 5120, 16384, 1, true, false),
        ("V2 shared gate", 3072, 5120, 1, true, false),
        ("V2 shared down", 5120, 3072, 1, true, false),
        ("V2 router gate", 160, 5120, 1, true, true),
        ("V2 lm_head", 102400, 5120, 1, true, true),
        ("Lite q", 3072, 2048, 1, true, false),
        ("Lite kv_a", 576, 2048, 1, true, false),
        ("Lite o_proj", 2048, 2048, 1, true, false),
        ("Lite shared down", 2048, 2816, 1, true, false),
    ];
    for (label, n, k, batch, w_nk, f32_out) in shapes {
        let w_len = batch * n * k;
        let mut w = Tensor::<bf16>::zeros(gpu, &[w_len])?;
        fill(gpu, &mut w, 3, 0.05)?;
        for m in [1usize, 2, 4, 8] {
            let mut x = Tensor::<bf16>::zeros(gpu, &[batch * m * k])?;
            fill(gpu, &mut x, 4, 1.0)?;
            let y = Tensor::<f32>::zeros(gpu, &[batch * m * n])?;
            let g = Gemm {
                m,
                n,
                k,
                x: x.ptr(),
                ldx: k,
                sx: m * k,
                w: w.ptr(),
                ldw: if w_nk { k } else { n },
                sw: n * k,
                w_nk,
                y: y.ptr(),
                ldy: n,
                sy: m * n,
                batch,
            };
            let bytes = (w_len * 2 + batch * m * (k * 2 + n * if f32_out { 4 } else { 2 })) as f64;
            let roof_ms = bytes / (copy_gbs * 1e9) * 1e3;
            let run = |use_gemv: bool| -> Result<f64> {
                let plan = gemv::plan(&g, gpu.sm_count, true);
                time_ms(gpu, 3, 20, || {
                    // SAFETY: x, w, y are allocated above with the extents g addresses.
                    unsafe {
                        match (use_gemv, plan, f32_out) {
                            (true, Some(p), true) => gemv::gemv::<f32>(gpu, &g, p, false)?,
                            (true, Some(p), false) => gemv::gemv::<bf16>(gpu, &g, p, false)?,
                            (_, _, true) => gemm::cublas_strided::<f32>(gpu, &g)?,
                            (_, _, false) => gemm::cublas_strided::<bf16>(gpu, &g)?,
                        }
                    }
                    Ok(())
                })
            };
            let ms_blas = run(false)?;
            let gemv_col = match gemv::plan(&g, gpu.sm_count, true) {
                Some(p) => {
                    let ms = run(true)?;
                    format!(
                        "GEMV {ms:.4} ms = {:.2}x roofline (splits {})",
                        ms / roof_ms,
                        p.splits
                    )
                }
                None => "GEMV n/a".into(),
            };
            println!(
                "G {label} M {m} N {n} K {k} x{batch}: {gemv_col}; cuBLAS {ms_blas:.4} ms = {:.2}x roofline; roofline {roof_ms:.4} ms ({:.1} MB)",
                ms_blas / roof_ms,
                bytes / 1e6
            );
        }
    }
    Ok(())
}

fn bench(gpu: &Gpu, p1_only: bool, mla_kernels: &[mla::MlaKernel]) -> Result<()> {
    println!("\n== measurements (CUDA events; each beside a ceiling measured in this run) ==");
    let copy_gbs = copy_ceiling(gpu)?;

    let blas_tflops = blas_ceiling(gpu)?;

    // P1: MLA decode, batch 64, context 4096, 128 heads, 512 + 64
    // The two 64-head rows tell where the time goes (same 128 CTAs and the same FLOPs as the
    // P1 row for "batch 128, 64 heads"): at 128 heads the two head groups of a sequence read the
    // same cache tiles, which L2 may or may not serve twice. If 128 x 64 heads costs about what
    // 64 x 128 heads does, the kernel is bound by its own compute and barriers, not by DRAM.
    use mla::MlaKernel::{Mma, Narrow, NarrowRs, Roles, Seesaw, Tma, TmaPair, Wgmma};
    let contiguous = std::env::var("DSV2_P1_CONTIGUOUS").is_ok_and(|v| v == "1");
    if contiguous {
        println!("P1 rows below: each sequence's cache blocks contiguous (DSV2_P1_CONTIGUOUS=1)");
    }
    // DSV2_P1_BLOCK: the cache's block size in tokens (default 64). The router's default is 16,
    // where the TMA kernels copy a tile in four pieces instead of one: 16 measures what serving
    // at the default costs them.
    let bs: usize = match std::env::var("DSV2_P1_BLOCK") {
        Err(_) => 64,
        Ok(v) => match v.parse::<usize>() {
            Ok(b) if b > 0 && 512 % b == 0 => b,
            _ => bail!(
                "DSV2_P1_BLOCK={v:?}: expected a block size that divides 512 (the shortest P1 context)"
            ),
        },
    };
    if bs != 64 {
        println!("P1 rows below: cache blocks of {bs} tokens (DSV2_P1_BLOCK)");
    }
    for (batch, ctx, heads, force, kernel) in [
        (64usize, 4096usize, 128usize, None, Wgmma),
        (64, 4096, 128, Some(1usize), Wgmma),
        (64, 4096, 128, Some(2usize), Wgmma),
        (1, 4096, 128, None, Wgmma),
        (64, 4096, 64, Some(1), Wgmma),
        (128, 4096, 64, Some(1), Wgmma),
        (64, 4096, 128, None, Mma),
        (1, 4096, 128, None, Mma),
        // issue 20's other rows: batch 128 at 128 heads, long context at batch 1 and 8
        (128, 4096, 128, None, Wgmma),
        (1, 32768, 128, None, Wgmma),
        (8, 32768, 128, None, Wgmma),
        // batch 1 at a short context, DeepSeek-V2 (128 heads) and V2-Lite (16 heads): latency,
        // and how many splits pay (the default keeps at least 2 tiles per split)
        (1, 512, 128, None, Wgmma),
        (1, 512, 128, Some(4), Wgmma),
        (1, 512, 128, Some(8), Wgmma),
        (1, 512, 16, None, Wgmma),
        (1, 512, 16, Some(8), Wgmma),
        // V2-Lite's batched decode (16 heads): 0.63 of copy inside its batch-256 step at context
        // 512 (bench/RESULTS.md session 17 ncu-step); both kernels pad 16 heads to their 64-head
        // CTA, the mma one over 32-token tiles
        (256, 512, 16, None, Wgmma),
        (64, 4096, 16, None, Wgmma),
        (256, 512, 16, None, Mma),
        (64, 4096, 16, None, Mma),
        // the tokens-on-M kernels for few heads (mla_narrow.cu), both forms of P.V
        // (batch 256 first: the row a profiler's first launch of the kernel should see)
        (256, 512, 16, None, Narrow),
        (64, 4096, 16, None, Narrow),
        (1, 512, 16, None, Narrow),
        (256, 512, 16, None, NarrowRs),
        (64, 4096, 16, None, NarrowRs),
        (1, 512, 16, None, NarrowRs),
        // the seesaw kernel (mla_seesaw.cu) on issue 20's rows, last
        (64, 4096, 128, None, Seesaw),
        (128, 4096, 128, None, Seesaw),
        (128, 4096, 64, Some(1), Seesaw),
        (64, 4096, 64, Some(1), Seesaw),
        (1, 32768, 128, None, Seesaw),
        (8, 32768, 128, None, Seesaw),
        (1, 512, 128, None, Seesaw),
        (1, 512, 16, None, Seesaw),
        // the TMA kernel with fixed warpgroup roles (mla_tma.cu), last
        (64, 4096, 128, None, Tma),
        (128, 4096, 128, None, Tma),
        (128, 4096, 64, Some(1), Tma),
        (64, 4096, 64, Some(1), Tma),
        (1, 32768, 128, None, Tma),
        (8, 32768, 128, None, Tma),
        (1, 512, 128, None, Tma),
        (1, 512, 16, None, Tma),
        // the same with the two head groups of a sequence as a cluster sharing the copies
        (64, 4096, 128, None, TmaPair),
        (128, 4096, 128, None, TmaPair),
        (1, 32768, 128, None, TmaPair),
        (8, 32768, 128, None, TmaPair),
        (1, 512, 128, None, TmaPair),
        // three warpgroups with one job each, Q in registers, three tile buffers (mla_roles.cu)
        (64, 4096, 128, None, Roles),
        (128, 4096, 128, None, Roles),
        (128, 4096, 64, Some(1), Roles),
        (64, 4096, 64, Some(1), Roles),
        (1, 32768, 128, None, Roles),
        (8, 32768, 128, None, Roles),
        (1, 512, 128, None, Roles),
        (1, 512, 16, None, Roles),
    ] {
        if !mla_kernels.contains(&kernel) || !kernel.supports_block_size(bs) {
            continue;
        }
        let blocks_per = ctx / bs;
        let nblocks = batch * blocks_per;
        let mut cache = Tensor::<bf16>::zeros(gpu, &[nblocks, bs, mla::CACHE_DIM])?;
        fill(gpu, &mut cache, 3, 1.0)?;
        let mut qa = Tensor::<bf16>::zeros(gpu, &[batch, heads, mla::KV_LORA])?;
        let mut qp = Tensor::<bf16>::zeros(gpu, &[batch, heads, mla::ROPE])?;
        fill(gpu, &mut qa, 4, 0.1)?;
        fill(gpu, &mut qp, 5, 0.1)?;
        // blocks of different sequences interleaved, as a running server's allocator leaves them
        // (DSV2_P1_CONTIGUOUS=1: each sequence's blocks in order, to see what the scatter costs)
        let table: Vec<i32> = (0..batch * blocks_per)
            .map(|i| {
                if contiguous {
                    i as i32
                } else {
                    ((i % blocks_per) * batch + i / blocks_per) as i32
                }
            })
            .collect();
        let bt = Tensor::from_host(gpu, &table, &[batch, blocks_per])?;
        let sl = Tensor::from_host(gpu, &vec![ctx as i32; batch], &[batch])?;
        let mut out = Tensor::<bf16>::zeros(gpu, &[batch, heads, mla::KV_LORA])?;
        let ms = time_ms(gpu, 3, 20, || {
            mla::mla_decode(
                gpu,
                mla::MlaDecodeParams {
                    q_abs: qa.view(),
                    q_pe: qp.view(),
                    cache: cache.view(),
                    block_table: bt.view(),
                    seq_lens: sl.view(),
                    out: out.view_mut(),
                    max_seq_len: ctx,
                    scale: 0.1,
                    splits: force,
                    kernel: Some(kernel),
                    uv: None,
                },
            )?;
            Ok(())
        })?;
        let bytes = (batch * ctx * mla::CACHE_DIM * 2) as f64;
        let gbs = bytes / (ms * 1e-3) / 1e9;
        let flops = 2.0 * (batch * ctx * heads) as f64 * (mla::CACHE_DIM + mla::KV_LORA) as f64;
        // the binding roofline: max(cache bytes / copy bandwidth, FLOPs / cuBLAS rate)
        let (t_bytes, t_flops) = (bytes / (copy_gbs * 1e9), flops / (blas_tflops * 1e12));
        let roof_ms = t_bytes.max(t_flops) * 1e3;
        println!(
            "P1 MLA decode ({kernel:?}) batch {batch} ctx {ctx} heads {heads}: {ms:.3} ms, {:.1} MB, {:.1} GFLOP; cache read {gbs:.0} GB/s = {:.3} of copy; {:.0} TFLOP/s ({:.3} of cuBLAS); roofline {roof_ms:.3} ms ({} bound), {:.3} of it; splits {}",
            bytes / 1e6,
            flops / 1e9,
            gbs / copy_gbs,
            flops / (ms * 1e-3) / 1e12,
            flops / (ms * 1e-3) / 1e12 / blas_tflops,
            if t_bytes >= t_flops { "bytes" } else { "FLOPs" },
            roof_ms / ms,
            force.unwrap_or_else(|| mla::choose_splits(gpu.sm_count, batch, heads, ctx, kernel))
        );
        // where a split row's time goes: the combine pass alone (its own launch)
        let splits =
            force.unwrap_or_else(|| mla::choose_splits(gpu.sm_count, batch, heads, ctx, kernel));
        if splits > 1 {
            let cb = mla::CombineBench::new(gpu, batch, splits, heads)?;
            let cms = time_ms(gpu, 3, 20, || Ok(cb.run(gpu, &mut out.view_mut())?))?;
            println!(
                "P1   combine alone ({splits} splits, {:.1} MB of f32 partials): {cms:.3} ms = {:.2} of the row",
                (batch * splits * heads * mla::KV_LORA * 4) as f64 / 1e6,
                cms / ms
            );
        }
    }
    bench_fp8(gpu, copy_gbs, blas_tflops)?;
    bench_prefill(gpu, blas_tflops)?;

    if p1_only {
        return Ok(());
    }
    bench_gemv(gpu, copy_gbs)?;
    bench_p2(gpu, copy_gbs, blas_tflops)
}

/// Tensor-core probes (probe.cu): one CTA per SM, operands in shared memory, no loads; each
/// kernel's TFLOP/s beside the cuBLAS ceiling of the same process.
fn bench_probes(gpu: &Gpu, blas_tflops: f64) -> Result<()> {
    let out = Tensor::<f32>::zeros(gpu, &[256])?;
    let iters: i32 = 4000;
    let n256 = 2.0 * 4.0 * (64 * 256 * 16 * 2) as f64; // 2 warpgroups x 4 m64n256k16
    let n64 = 36.0 * (64 * 64 * 16 * 2) as f64; // one warpgroup's 36 m64n64k16
    for (name, what, flops_per_iter) in [
        (
            "probe_n256_kmajor_wait0",
            "m64n256k16 SS, B K-major, 2 warpgroups, each group of 4 waited (grouped W128)",
            n256,
        ),
        (
            "probe_n256_kmajor_wait1",
            "m64n256k16 SS, B K-major, 2 warpgroups, one group of 4 in flight (grouped Ws128)",
            n256,
        ),
        (
            "probe_n256_mnmajor_wait0",
            "m64n256k16 SS, B MN-major, 2 warpgroups, each group waited (MLA P.V)",
            n256,
        ),
        (
            "probe_n64_both",
            "36 m64n64k16 SS per group, 2 warpgroups (MLA S, both)",
            2.0 * n64,
        ),
        (
            "probe_n64_one",
            "36 m64n64k16 SS per group, warpgroup 0 alone (MLA S of the TMA kernel)",
            n64,
        ),
    ] {
        gpu.set_max_dynamic_smem(name, 65 * 1024)?;
        let f = gpu.function(name)?;
        let optr = out.ptr();
        let ms = time_ms(gpu, 2, 5, || {
            let mut b = gpu.launch(f);
            b.arg(&optr).arg(&iters);
            let cfg = cudarc::driver::LaunchConfig {
                grid_dim: (gpu.sm_count as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 65 * 1024,
            };
            // SAFETY: matches probe.cu's (float* out, int iters); out holds 256 floats.
            unsafe { b.launch(cfg) }?;
            Ok(())
        })?;
        let tflops = flops_per_iter * iters as f64 * gpu.sm_count as f64 / (ms * 1e-3) / 1e12;
        println!(
            "PROBE {what}: {ms:.3} ms, {tflops:.0} TFLOP/s = {:.3} of cuBLAS",
            tflops / blas_tflops
        );
    }
    Ok(())
}

/// Load-stream probes (probe.cu): one CTA per SM pulls 64-token MLA cache tiles (73.7 KB, 9 TMA
/// boxes) through a ring of 1, 2 or 3 tile buffers with no math, each CTA its own rows or two
/// CTAs the same rows (the two head groups of a 128-head sequence). Prints the bytes delivered
/// to shared memory and the unique bytes read, per second, beside the copy ceiling: what a
/// decode kernel with that many tiles in flight can feed at best.
fn bench_stream_probes(gpu: &Gpu, copy_gbs: f64) -> Result<()> {
    use dsv2_kernels::ops::tma::encode_bf16_2d;
    let tiles: i32 = 64; // a 4096-token context per CTA
    let ctas = gpu.sm_count / 2 * 2;
    let rows = ctas * tiles as usize * 64;
    let cache = Tensor::<bf16>::zeros(gpu, &[rows, mla::CACHE_DIM])?;
    let map = encode_bf16_2d("probe_stream", cache.ptr(), rows, mla::CACHE_DIM, 64, 64)?;
    for nbuf in 1..=3usize {
        for shared in [false, true] {
            let name = format!(
                "probe_stream_buf{nbuf}_{}",
                if shared { "shared" } else { "own" }
            );
            let smem = nbuf * 9 * 8192 + 64 + 1024;
            gpu.set_max_dynamic_smem(&name, smem)?;
            let f = gpu.function(&name)?;
            let ms = time_ms(gpu, 2, 10, || {
                let mut b = gpu.launch(f);
                b.arg(&map).arg(&tiles);
                let cfg = cudarc::driver::LaunchConfig {
                    grid_dim: (ctas as u32, 1, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: smem as u32,
                };
                // SAFETY: matches probe_stream_*(TmaMap map, int tiles); the map covers `rows`
                // rows, every CTA reads at most ctas * tiles * 64 of them.
                unsafe { b.launch(cfg) }?;
                Ok(())
            })?;
            let delivered = (ctas * tiles as usize * 9 * 8192) as f64;
            let unique = if shared { delivered / 2.0 } else { delivered };
            let (d_gbs, u_gbs) = (delivered / (ms * 1e-3) / 1e9, unique / (ms * 1e-3) / 1e9);
            println!(
                "PROBE stream {nbuf} tile buffer(s), {}: {ms:.3} ms, {:.2} us per tile per CTA; delivered {d_gbs:.0} GB/s, unique {u_gbs:.0} GB/s = {:.3} of copy",
                if shared {
                    "two CTAs per rows (128 heads)"
                } else {
                    "each CTA its own rows"
                },
                ms * 1e3 / tiles as f64,
                u_gbs / copy_gbs
            );
        }
    }
    Ok(())
}

/// Ceiling 2: cuBLAS bf16 8192^3, Y = X W^T (TFLOP/s).
fn blas_ceiling(gpu: &Gpu) -> Result<f64> {
    // ceiling 2: cuBLAS bf16 8192^3, Y = X W^T
    let s = 8192;
    let mut x = Tensor::<bf16>::zeros(gpu, &[s, s])?;
    let mut w = Tensor::<bf16>::zeros(gpu, &[s, s])?;
    fill(gpu, &mut x, 1, 1.0)?;
    fill(gpu, &mut w, 2, 1.0)?;
    let mut y = Tensor::<bf16>::zeros(gpu, &[s, s])?;
    let ms = time_ms(gpu, 3, 10, || {
        gemm::gemm(
            gpu,
            gemm::GemmParams {
                x: x.view(),
                w: w.view(),
                y: y.view_mut(),
                alpha: 1.0,
                beta: 0.0,
            },
        )?;
        Ok(())
    })?;
    let blas_tflops = 2.0 * (s as f64).powi(3) / (ms * 1e-3) / 1e12;
    println!("cuBLAS bf16 8192^3 (X W^T, f32 acc): {ms:.3} ms, {blas_tflops:.0} TFLOP/s");
    drop((x, w, y));
    Ok(blas_tflops)
}

/// P2 (the per-expert cuBLAS loop, the whole routed path) and the grouped kernels' rows beside
/// it (P2g per row tile, decode rows).
fn bench_p2(gpu: &Gpu, copy_gbs: f64, blas_tflops: f64) -> Result<()> {
    // P2: expert FFN, 8192 tokens x top-6 over 160 experts, hidden 5120, inter 1536
    let (tokens, n_exp, hidden, inter, k) = (8192usize, 160usize, 5120usize, 1536usize, 6usize);
    let mut gu_w = Tensor::<bf16>::zeros(gpu, &[n_exp, 2 * inter, hidden])?;
    let mut d_w = Tensor::<bf16>::zeros(gpu, &[n_exp, hidden, inter])?;
    fill(gpu, &mut gu_w, 6, 0.02)?;
    fill(gpu, &mut d_w, 7, 0.02)?;
    let mut xt = Tensor::<bf16>::zeros(gpu, &[tokens, hidden])?;
    fill(gpu, &mut xt, 8, 1.0)?;
    // routing from the real gate on random logits (group-limited, 8 groups / top-3 / top-6)
    let cfg = V2_GATE;
    let (lt, mut ids, mut wts) = random_routing(gpu, tokens, n_exp, cfg, 0x1234_5678)?;
    let perm = moe::moe_permute(
        gpu,
        moe::PermuteParams {
            ids: ids.view(),
            n_experts: n_exp,
        },
    )?;
    let counts: Vec<usize> = perm
        .counts
        .to_host(gpu)?
        .iter()
        .map(|&c| c as usize)
        .collect();
    let rows: usize = counts.iter().sum();
    let mut px = Tensor::<bf16>::zeros(gpu, &[rows, hidden])?;
    let mut gu = Tensor::<bf16>::zeros(gpu, &[rows, 2 * inter])?;
    let mut act = Tensor::<bf16>::zeros(gpu, &[rows, inter])?;
    let mut yo = Tensor::<bf16>::zeros(gpu, &[rows, hidden])?;
    let mut comb = Tensor::<bf16>::zeros(gpu, &[tokens, hidden])?;
    moe::moe_gather(
        gpu,
        moe::GatherParams {
            x: xt.view(),
            src_row: perm.src_row.view(),
            out: px.view_mut(),
        },
    )?;
    let ms = time_ms(gpu, 2, 10, || {
        expert::expert_ffn(
            gpu,
            expert::ExpertFfnParams {
                x: px.view(),
                gate_up: gu_w.view(),
                down: d_w.view(),
                counts: &counts,
                gu: gu.view_mut(),
                act: act.view_mut(),
                out: yo.view_mut(),
            },
        )?;
        Ok(())
    })?;
    let flops = 2.0 * rows as f64 * (hidden * 2 * inter + inter * hidden) as f64;
    let tf = flops / (ms * 1e-3) / 1e12;
    let (cmin, cmax) = (
        counts.iter().min().copied().unwrap_or(0),
        counts.iter().max().copied().unwrap_or(0),
    );
    println!(
        "P2 expert FFN {tokens} tok x top{k} / {n_exp} experts (rows/expert {cmin}..{cmax}): {ms:.3} ms, {tf:.0} TFLOP/s = {:.3} of cuBLAS",
        tf / blas_tflops
    );
    // the whole routed path: gate + permute + counts to host + gather + FFN + combine
    let ms_all = time_ms(gpu, 1, 5, || {
        moe::moe_gate(
            gpu,
            moe::GateParams {
                logits: lt.view(),
                ids: ids.view_mut(),
                weights: wts.view_mut(),
                cfg,
            },
        )?;
        routed_loop(
            gpu,
            RoutedLoop {
                x: &xt,
                ids: &ids,
                weights: &wts,
                gate_up: &gu_w,
                down: &d_w,
                px: &mut px,
                gu: &mut gu,
                act: &mut act,
                y: &mut yo,
                out: &mut comb,
            },
        )?;
        Ok(())
    })?;
    println!(
        "P2' routed MoE path incl. gate/permute/host counts/gather/combine: {ms_all:.3} ms, {:.0} TFLOP/s = {:.3} of cuBLAS",
        flops / (ms_all * 1e-3) / 1e12,
        flops / (ms_all * 1e-3) / 1e12 / blas_tflops
    );
    bench_grouped(gpu, copy_gbs, blas_tflops, &gu_w, &d_w, &px, &perm, ms)?;
    Ok(())
}

/// The grouped expert kernels (issue 19) beside the per-expert cuBLAS loop, on P2's weights
/// (160 experts, hidden 5120, inter 1536, stacked [E, 2I, H] / [E, H, I]):
/// - P2g: the FFN alone over P2's permuted rows (compute bound) against the cuBLAS peak;
/// - decode rows at 1, 8, 64 and 256 distinct tokens (routing by the real gate on random logits,
///   so a batch touches as many experts as distinct prompts do): the whole routed path, against
///   max(touched experts' weight bytes / copy bandwidth, FLOPs / cuBLAS peak).
#[allow(clippy::too_many_arguments)]
fn bench_grouped(
    gpu: &Gpu,
    copy_gbs: f64,
    blas_tflops: f64,
    gu_w: &Tensor<bf16>,
    d_w: &Tensor<bf16>,
    px: &Tensor<bf16>,
    perm: &moe::Permutation,
    p2_ms: f64,
) -> Result<()> {
    use dsv2_kernels::ops::{grouped, small_experts};
    let (n_exp, two_i, hidden) = (gu_w.shape()[0], gu_w.shape()[1], gu_w.shape()[2]);
    let inter = two_i / 2;
    let bsz = 2u64;
    let mut ptrs = Vec::with_capacity(n_exp * 3);
    for e in 0..n_exp as u64 {
        let (i, h) = (inter as u64, hidden as u64);
        ptrs.push((gu_w.ptr() + e * 2 * i * h * bsz) as i64);
        ptrs.push((gu_w.ptr() + (e * 2 * i + i) * h * bsz) as i64);
        ptrs.push((d_w.ptr() + e * h * i * bsz) as i64);
    }
    let table = Tensor::from_host(gpu, &ptrs, &[n_exp, 3])?;
    let rows = px.shape()[0];
    let flops = 2.0 * rows as f64 * (3 * inter * hidden) as f64;
    let mut act = Tensor::<bf16>::zeros(gpu, &[rows, inter])?;
    let mut y = Tensor::<bf16>::zeros(gpu, &[rows, hidden])?;
    for tile in [
        grouped::RowTile::Ws128Dyn,
        grouped::RowTile::Ws128Pair,
        grouped::RowTile::Ws128,
        grouped::RowTile::W128,
        grouped::RowTile::W64,
        grouped::RowTile::R128,
        grouped::RowTile::R64,
        // new last: a crash of it leaves the other rows printed
        grouped::RowTile::Ws128PairDyn,
    ] {
        let ms = time_ms(gpu, 2, 10, || {
            // SAFETY: the table addresses P2's stacked weights, alive for this function.
            unsafe {
                grouped::grouped_ffn(
                    gpu,
                    grouped::GroupedFfnParams {
                        x: px.view(),
                        counts: perm.counts.view(),
                        offsets: perm.offsets.view(),
                        ptrs: table.view(),
                        act: act.view_mut(),
                        out: y.view_mut(),
                        tile,
                    },
                )?;
            }
            Ok(())
        })?;
        let tf = flops / (ms * 1e-3) / 1e12;
        println!(
            "P2g grouped expert FFN (tile {tile:?}) {rows} rows / {n_exp} experts: {ms:.3} ms, {tf:.0} TFLOP/s = {:.3} of cuBLAS; {:.2}x the per-expert cuBLAS loop",
            tf / blas_tflops,
            p2_ms / ms
        );
    }
    drop((act, y));

    let cfg = V2_GATE;
    let k = cfg.top_k;
    for tokens in [1usize, 8, 64, 256] {
        let mut xt = Tensor::<bf16>::zeros(gpu, &[tokens, hidden])?;
        fill(gpu, &mut xt, 20 + tokens as u64, 1.0)?;
        let (_, ids, wts) = random_routing(
            gpu,
            tokens,
            n_exp,
            cfg,
            0x9e37_79b9_7f4a_7c15 ^ tokens as u64,
        )?;
        let host_ids = ids.to_host(gpu)?;
        let mut touched = vec![false; n_exp];
        for &e in &host_ids {
            touched[e as usize] = true;
        }
        let touched = touched.iter().filter(|&&t| t).count();
        let routed = tokens * k;
        let bytes = (touched * 3 * inter * hidden * 2 + 2 * tokens * hidden * 2) as f64;
        let fl = 2.0 * routed as f64 * (3 * inter * hidden) as f64;
        let roof_ms = (bytes / (copy_gbs * 1e9)).max(fl / (blas_tflops * 1e12)) * 1e3;
        let mut out = Tensor::<bf16>::zeros(gpu, &[tokens, hidden])?;
        // the launcher's decode tile, one CTA a tile, then its persistent form
        // (DSV2_GROUPED_DECODE=persistent)
        let grid_tile = grouped::RowTile::for_rows(routed, touched);
        let persistent = grid_tile.persistent();
        let mut ms_tiles = Vec::with_capacity(2);
        for tile in [grid_tile, persistent] {
            ms_tiles.push(time_ms(gpu, 3, 20, || {
                // SAFETY: as above; ids come from the gate (0..n_exp).
                unsafe {
                    grouped::grouped_experts(
                        gpu,
                        grouped::GroupedExpertsParams {
                            x: xt.view(),
                            ids: ids.view(),
                            weights: wts.view(),
                            ptrs: table.view(),
                            inter,
                            out: out.view_mut(),
                            routed_rows: Some(routed),
                            touched_experts: Some(touched),
                            tile: Some(tile),
                            prefill_tile: grouped::PREFILL_TILE,
                            accumulate: false,
                            before_combine: None,
                        },
                    )?;
                }
                Ok(())
            })?);
        }
        let (ms_grouped, ms_persistent) = (ms_tiles[0], ms_tiles[1]);
        // the path it replaces: permute, counts to the host, gather, per-expert cuBLAS, combine
        let mut pxd = Tensor::<bf16>::zeros(gpu, &[routed, hidden])?;
        let mut gu = Tensor::<bf16>::zeros(gpu, &[routed, two_i])?;
        let mut actd = Tensor::<bf16>::zeros(gpu, &[routed, inter])?;
        let mut yo = Tensor::<bf16>::zeros(gpu, &[routed, hidden])?;
        let ms_loop = time_ms(gpu, 2, 10, || {
            routed_loop(
                gpu,
                RoutedLoop {
                    x: &xt,
                    ids: &ids,
                    weights: &wts,
                    gate_up: gu_w,
                    down: d_w,
                    px: &mut pxd,
                    gu: &mut gu,
                    act: &mut actd,
                    y: &mut yo,
                    out: &mut out,
                },
            )
        })?;
        let small = if tokens <= small_experts::SMALL_EXPERTS_MAX_ROWS {
            let mut sa = Tensor::<bf16>::zeros(gpu, &[routed, inter])?;
            let mut line = String::new();
            for down in [
                small_experts::SmallDown::Pipe,
                small_experts::SmallDown::Slots,
                small_experts::SmallDown::Rows,
            ] {
                // only the kernels that really run at this shape (no fallback under another name)
                if down.runs_as(tokens, hidden, k, inter, gpu.sm_count) != Some(down) {
                    continue;
                }
                let ms = time_ms(gpu, 3, 20, || {
                    // SAFETY: as above.
                    unsafe {
                        small_experts::small_experts_with(
                            gpu,
                            small_experts::SmallExpertsParams {
                                x: xt.view(),
                                ids: ids.view(),
                                weights: wts.view(),
                                ptrs: table.view(),
                                act: sa.view_mut(),
                                out: out.view_mut(),
                                shared: None,
                                shared_beside: None,
                            },
                            down,
                        )?;
                    }
                    Ok(())
                })?;
                line.push_str(&format!(
                    "; small-batch kernels ({down:?} down) {ms:.3} ms = {:.2}x roofline",
                    ms / roof_ms
                ));
            }
            line
        } else {
            String::new()
        };
        println!(
            "D{tokens} routed experts, {tokens} distinct tokens, {touched} of {n_exp} experts touched ({:.1} MB weights): grouped {ms_grouped:.3} ms = {:.2}x roofline ({:.3} of copy bandwidth); {persistent:?} {ms_persistent:.3} ms ({:.3} of copy); per-expert cuBLAS loop {ms_loop:.3} ms = {:.2}x roofline; roofline {roof_ms:.3} ms{small}",
            bytes / 1e6,
            ms_grouped / roof_ms,
            bytes / (ms_grouped * 1e-3) / 1e9 / copy_gbs,
            bytes / (ms_persistent * 1e-3) / 1e9 / copy_gbs,
            ms_loop / roof_ms
        );
    }
    Ok(())
}

/// The routed-expert path the grouped kernels replace, on stacked weights gate_up [E, 2I, H] and
/// down [E, H, I]: permute, counts to the host, gather, one cuBLAS GEMM per (expert,
/// projection), combine into `out`.
struct RoutedLoop<'a> {
    x: &'a Tensor<bf16>,
    ids: &'a Tensor<i32>,
    weights: &'a Tensor<f32>,
    gate_up: &'a Tensor<bf16>,
    down: &'a Tensor<bf16>,
    px: &'a mut Tensor<bf16>,
    gu: &'a mut Tensor<bf16>,
    act: &'a mut Tensor<bf16>,
    y: &'a mut Tensor<bf16>,
    out: &'a mut Tensor<bf16>,
}

fn routed_loop(gpu: &Gpu, r: RoutedLoop<'_>) -> Result<()> {
    let p = moe::moe_permute(
        gpu,
        moe::PermuteParams {
            ids: r.ids.view(),
            n_experts: r.gate_up.shape()[0],
        },
    )?;
    let c: Vec<usize> = p.counts.to_host(gpu)?.iter().map(|&c| c as usize).collect();
    moe::moe_gather(
        gpu,
        moe::GatherParams {
            x: r.x.view(),
            src_row: p.src_row.view(),
            out: r.px.view_mut(),
        },
    )?;
    expert::expert_ffn(
        gpu,
        expert::ExpertFfnParams {
            x: r.px.view(),
            gate_up: r.gate_up.view(),
            down: r.down.view(),
            counts: &c,
            gu: r.gu.view_mut(),
            act: r.act.view_mut(),
            out: r.y.view_mut(),
        },
    )?;
    moe::moe_combine(
        gpu,
        moe::CombineParams {
            y: r.y.view(),
            slot_of: p.slot_of.view(),
            weights: r.weights.view(),
            out: r.out.view_mut(),
            accumulate: false,
        },
    )?;
    Ok(())
}

/// DeepSeek-V2's routing: 160 experts in 8 groups, the best 3 groups, top-6, weights x 16.
const V2_GATE: moe::GateConfig = moe::GateConfig {
    n_group: 8,
    topk_group: 3,
    top_k: 6,
    norm_topk_prob: false,
    routed_scaling_factor: 16.0,
};

/// The gate kernel's choice for `tokens` rows of uniform logits in [-2, 2) (xorshift from
/// `seed`), so a batch touches as many experts as distinct prompts do: (logits [tokens, E],
/// ids [tokens, k], weights [tokens, k]).
fn random_routing(
    gpu: &Gpu,
    tokens: usize,
    n_exp: usize,
    cfg: moe::GateConfig,
    seed: u64,
) -> Result<(Tensor<f32>, Tensor<i32>, Tensor<f32>)> {
    let mut g = seed;
    let logits: Vec<f32> = (0..tokens * n_exp)
        .map(|_| {
            g ^= g << 13;
            g ^= g >> 7;
            g ^= g << 17;
            (g >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect();
    let lt = Tensor::from_host(gpu, &logits, &[tokens, n_exp])?;
    let mut ids = Tensor::<i32>::zeros(gpu, &[tokens, cfg.top_k])?;
    let mut wts = Tensor::<f32>::zeros(gpu, &[tokens, cfg.top_k])?;
    moe::moe_gate(
        gpu,
        moe::GateParams {
            logits: lt.view(),
            ids: ids.view_mut(),
            weights: wts.view_mut(),
            cfg,
        },
    )?;
    Ok((lt, ids, wts))
}
