//! Every op against its reference on the GPU at awkward sizes (1, 7, 67, 5137 rows) and real
//! DeepSeek-V2 dims. Without a CUDA driver or device each test prints why and passes.

use dsv2_kernels::check::{self, CheckRow, ROWS};
use dsv2_kernels::ops::mla::MlaKernel;
use dsv2_kernels::ops::moe::GateConfig;
use dsv2_kernels::{Gpu, GpuOptions, KernelError};

fn gpu() -> Option<Gpu> {
    match Gpu::open(&GpuOptions::default()) {
        Ok(g) => Some(g),
        Err(e @ (KernelError::NoDriver(_) | KernelError::NoDevice(_))) => {
            eprintln!("SKIP (no GPU): {e}");
            None
        }
        Err(e) => panic!("GPU present but could not be opened: {e}"),
    }
}

fn assert_rows(rows: Vec<CheckRow>) {
    check::print_table(&rows);
    for r in rows {
        assert!(
            r.pass,
            "{} {}: rel_l2 {} max_abs {} tol {} {}",
            r.op, r.sizes, r.rel_l2, r.max_abs, r.tol, r.note
        );
    }
}

#[test]
fn no_driver_is_a_clear_error() {
    if dsv2_kernels::device::driver_available() {
        eprintln!("SKIP: a driver is present here");
        return;
    }
    let e = Gpu::open(&GpuOptions::default())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.starts_with("no CUDA driver found"), "{e}");
}

#[test]
fn elementwise_ops() {
    let Some(g) = gpu() else { return };
    let mut rows = Vec::new();
    for n in ROWS {
        rows.push(check::check_embedding(&g, n, 5120, 4096).unwrap());
        rows.extend(check::check_rmsnorm(&g, n, 5120, false).unwrap());
        rows.extend(check::check_rmsnorm(&g, n, 5120, true).unwrap());
        rows.push(check::check_silu_mul(&g, n, 1536).unwrap());
        rows.push(
            check::check_rope(
                &g,
                n,
                if n > 67 { 1 } else { 128 },
                if n > 67 { 64 } else { 192 },
                if n > 67 { 0 } else { 128 },
            )
            .unwrap(),
        );
    }
    assert_rows(rows);
}

#[test]
fn gemm_and_experts() {
    let Some(g) = gpu() else { return };
    let mut rows = Vec::new();
    for n in ROWS {
        rows.push(check::check_gemm(&g, n, 1536, 5120).unwrap());
    }
    rows.push(check::check_expert_ffn(&g, 67, 8, 5120, 1536).unwrap());
    rows.push(check::check_expert_ffn(&g, 7, 3, 512, 64).unwrap());
    assert_rows(rows);
}

#[test]
fn moe_routing() {
    let Some(g) = gpu() else { return };
    let (v2, lite) = (GateConfig::deepseek_v2(), GateConfig::deepseek_v2_lite());
    let mut rows = Vec::new();
    for n in ROWS {
        rows.push(check::check_gate(&g, n, 160, v2).unwrap());
        rows.push(check::check_gate(&g, n, 64, lite).unwrap());
        rows.extend(check::check_permute_combine(&g, n, 160, 5120).unwrap());
    }
    rows.push(
        check::check_gate(
            &g,
            67,
            160,
            GateConfig {
                norm_topk_prob: true,
                ..v2
            },
        )
        .unwrap(),
    );
    assert_rows(rows);
}

#[test]
fn mla_decode_and_cache() {
    let Some(g) = gpu() else { return };
    let mut rows = Vec::new();
    for n in ROWS {
        rows.push(check::check_cache_append(&g, n).unwrap());
    }
    let cases: [(&[usize], usize, usize, Option<usize>); 6] = [
        (&[1], 128, 64, None),
        (&[7, 1, 67, 130], 128, 64, None),
        (&[5137, 33, 1], 128, 64, None),
        (&[5137, 33, 1], 128, 64, Some(1)),
        (&[67, 300, 7], 16, 16, None),
        (&[64, 65, 63, 128], 100, 64, None),
    ];
    for k in [MlaKernel::Wgmma, MlaKernel::Mma] {
        for (lens, heads, block, splits) in cases {
            let layout = check::BlockLayout::Shuffled;
            rows.push(check::check_mla_decode(&g, lens, heads, block, splits, k, layout).unwrap());
        }
    }
    assert_rows(rows);
}

#[test]
fn fp8_latent_cache() {
    let Some(g) = gpu() else { return };
    assert_rows(check::fp8::run_fp8(&g).unwrap());
}

#[test]
fn sampling() {
    let Some(g) = gpu() else { return };
    let mut rows = Vec::new();
    for n in [1, 7, 67] {
        rows.push(check::check_argmax(&g, n, 102400).unwrap());
    }
    rows.push(check::check_argmax(&g, 5137, 1000).unwrap());
    rows.push(check::check_sample(&g, 67, 102400).unwrap());
    rows.push(check::check_sample(&g, 5137, 1000).unwrap());
    assert_rows(rows);
}
