//! Launchers for moe.cu: gating (softmax + group-limited greedy top-k), permutation of token rows
//! by expert, gather of permuted rows, and the weighted combine.

use cudarc::driver::LaunchConfig;
use half::bf16;

use super::{dim_i32, grid_for, per_row};
use crate::device::Gpu;
use crate::error::{KernelError, Result, shape_err};
use crate::tensor::{Tensor, View, ViewMut};

/// Routing hyper-parameters (DeepSeek-V2: 160 experts, 8 groups, top-3 groups, top-6,
/// no renormalisation, scaling 16).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateConfig {
    pub n_group: usize,
    pub topk_group: usize,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
}

impl GateConfig {
    /// DeepSeek-V2 / V2-Chat / Coder-V2 (160 experts): 8 groups, top-3 groups, top-6, scaling 16.
    pub fn deepseek_v2() -> Self {
        Self {
            n_group: 8,
            topk_group: 3,
            top_k: 6,
            norm_topk_prob: false,
            routed_scaling_factor: 16.0,
        }
    }

    /// DeepSeek-V2-Lite (64 experts): no groups, top-6, scaling 1.
    pub fn deepseek_v2_lite() -> Self {
        Self {
            n_group: 1,
            topk_group: 1,
            top_k: 6,
            norm_topk_prob: false,
            routed_scaling_factor: 1.0,
        }
    }
}

/// logits f32 [tokens, experts] -> ids i32 [tokens, top_k], weights f32 [tokens, top_k].
pub struct GateParams<'a> {
    pub logits: View<'a, f32>,
    pub ids: ViewMut<'a, i32>,
    pub weights: ViewMut<'a, f32>,
    pub cfg: GateConfig,
}

/// Whether `moe_gate_f32` can take its fast path (see moe.cu): experts a multiple of 32 (each lane
/// holds E / 32 neighbouring experts) and, with groups, each group a power-of-two run of whole lanes.
fn gate_fast_path(n_exp: usize, n_group: usize) -> bool {
    if n_exp == 0 || !n_exp.is_multiple_of(32) || n_exp > 256 {
        return false;
    }
    let per = n_exp / 32;
    if n_group <= 1 {
        return true;
    }
    let group = n_exp / n_group;
    group.is_multiple_of(per) && (group / per).is_power_of_two()
}

/// The routing hyper-parameters the gate kernels take for `n_exp` experts (both gate launchers).
fn check_gate_config(op: &'static str, n_exp: usize, c: &GateConfig) -> Result<()> {
    let bad = |what: String| Err(KernelError::Unsupported { op, what });
    if n_exp == 0 || n_exp > 256 {
        return bad(format!("{n_exp} experts (kernel supports 1..=256)"));
    }
    if c.top_k == 0 || c.top_k > 32 || c.top_k > n_exp {
        return bad(format!("top_k {} (1..=min(32, experts))", c.top_k));
    }
    if c.n_group == 0 || c.n_group > 32 || !n_exp.is_multiple_of(c.n_group) {
        return bad(format!(
            "n_group {} must divide {n_exp} and be <= 32",
            c.n_group
        ));
    }
    if c.n_group > 1
        && (c.topk_group == 0
            || c.topk_group > c.n_group
            || c.topk_group * (n_exp / c.n_group) < c.top_k)
    {
        return bad(format!(
            "topk_group {} of {} groups cannot hold top_k {}",
            c.topk_group, c.n_group, c.top_k
        ));
    }
    Ok(())
}

pub fn moe_gate(gpu: &Gpu, p: GateParams<'_>) -> Result<()> {
    const OP: &str = "moe_gate_f32";
    p.logits.expect(OP, "logits", &[None, None])?;
    let (tokens, n_exp) = (p.logits.shape()[0], p.logits.shape()[1]);
    let c = p.cfg;
    p.ids.expect(OP, "ids", &[Some(tokens), Some(c.top_k)])?;
    p.weights
        .expect(OP, "weights", &[Some(tokens), Some(c.top_k)])?;
    check_gate_config(OP, n_exp, &c)?;
    if tokens == 0 {
        return Ok(());
    }
    let (l, i, w) = (p.logits.ptr(), p.ids.ptr(), p.weights.ptr());
    let t = dim_i32(OP, "tokens", tokens)?;
    let (e, g, tg, k) = (
        n_exp as i32,
        c.n_group as i32,
        c.topk_group as i32,
        c.top_k as i32,
    );
    let norm = c.norm_topk_prob as i32;
    let scale = c.routed_scaling_factor;
    let contiguous = i32::from(gate_fast_path(n_exp, c.n_group));
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    b.arg(&l)
        .arg(&i)
        .arg(&w)
        .arg(&t)
        .arg(&e)
        .arg(&g)
        .arg(&tg)
        .arg(&k)
        .arg(&norm)
        .arg(&scale)
        .arg(&contiguous);
    // 4 warps per block, one token per warp
    let cfg = LaunchConfig {
        grid_dim: (tokens.div_ceil(4) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches moe_gate_f32's signature; shapes and the kernel's limits checked above.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Most rows [`moe_gate_gemv`] takes (GATE_MAX_ROWS in moe.cu).
pub const GATE_GEMV_MAX_ROWS: usize = 4;

/// The router gate's logits and top-k in one launch for a few rows: x bf16 [tokens, H],
/// w bf16 [E, H] (the gate weight), logits f32 [tokens, E] (written: the f32 gate logits),
/// counter i32 [1] (zero before the first launch; the kernel leaves it zero), ids / weights as
/// in [`GateParams`]. `Unsupported` beyond [`GATE_GEMV_MAX_ROWS`] rows or for expert counts off
/// moe_gate_f32's fast path: the caller then runs the GEMV and [`moe_gate`] apart.
pub struct GateGemvParams<'a> {
    /// The gate's input rows [tokens, H]: read, or with `norm` written (the normed rows).
    pub x: GateInput<'a>,
    pub w: View<'a, bf16>,
    pub logits: ViewMut<'a, f32>,
    pub counter: ViewMut<'a, i32>,
    pub ids: ViewMut<'a, i32>,
    pub weights: ViewMut<'a, f32>,
    pub cfg: GateConfig,
}

/// Where the gate's input rows come from.
// built for one launch and moved into it: the variants' size difference costs nothing
#[allow(clippy::large_enum_variant)]
pub enum GateInput<'a> {
    /// Rows already normed.
    Rows(View<'a, bf16>),
    /// The residual add and RMSNorm before the gate, in the gate's launch (as
    /// `elementwise::rmsnorm` with a residual, bit for bit): `res_out` = bf16(`x` + `residual`),
    /// `out` = rmsnorm(res_out) * `weight`. `res_out` is a buffer of its own: the launch reads
    /// `residual` in every block while one block writes the new residual.
    AddNorm {
        x: View<'a, bf16>,
        residual: View<'a, bf16>,
        weight: View<'a, bf16>,
        eps: f32,
        res_out: ViewMut<'a, bf16>,
        out: ViewMut<'a, bf16>,
    },
}

pub fn moe_gate_gemv(gpu: &Gpu, p: GateGemvParams<'_>) -> Result<()> {
    const OP: &str = "moe_gate_gemv_f32";
    let x = match &p.x {
        GateInput::Rows(x) => x,
        GateInput::AddNorm { x, .. } => x,
    };
    x.expect(OP, "x", &[None, None])?;
    let (tokens, hidden) = (x.shape()[0], x.shape()[1]);
    if let GateInput::AddNorm {
        residual,
        weight,
        res_out,
        out,
        ..
    } = &p.x
    {
        residual.expect(OP, "residual", &[Some(tokens), Some(hidden)])?;
        weight.expect(OP, "norm weight", &[Some(hidden)])?;
        res_out.expect(OP, "new residual", &[Some(tokens), Some(hidden)])?;
        out.expect(OP, "normed rows", &[Some(tokens), Some(hidden)])?;
        if res_out.ptr() == residual.ptr() {
            return Err(KernelError::Unsupported {
                op: OP,
                what: "the new residual in place of the old one".into(),
            });
        }
    }
    p.w.expect(OP, "w", &[None, Some(hidden)])?;
    let n_exp = p.w.shape()[0];
    let c = p.cfg;
    p.logits
        .expect(OP, "logits", &[Some(tokens), Some(n_exp)])?;
    p.counter.expect(OP, "counter", &[Some(1)])?;
    p.ids.expect(OP, "ids", &[Some(tokens), Some(c.top_k)])?;
    p.weights
        .expect(OP, "weights", &[Some(tokens), Some(c.top_k)])?;
    check_gate_config(OP, n_exp, &c)?;
    if tokens > GATE_GEMV_MAX_ROWS || !gate_fast_path(n_exp, c.n_group) || !hidden.is_multiple_of(8)
    {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!("{tokens} rows, {n_exp} experts, hidden {hidden}"),
        });
    }
    if tokens == 0 {
        return Ok(());
    }
    let (xp, w, l, cnt, i, wt) = (
        x.ptr(),
        p.w.ptr(),
        p.logits.ptr(),
        p.counter.ptr(),
        p.ids.ptr(),
        p.weights.ptr(),
    );
    let (t, h) = (
        dim_i32(OP, "tokens", tokens)?,
        dim_i32(OP, "hidden", hidden)?,
    );
    let (e, g, tg, k) = (
        n_exp as i32,
        c.n_group as i32,
        c.topk_group as i32,
        c.top_k as i32,
    );
    let norm = c.norm_topk_prob as i32;
    let scale = c.routed_scaling_factor;
    // the add + norm: x is then the residual's addend, and the normed rows go to `out`
    let (add_x, add_res, norm_w, res_out, x_out, eps, norm_threads, smem) = match &p.x {
        GateInput::Rows(_) => (0u64, 0u64, 0u64, 0u64, 0u64, 0f32, 0i32, 0usize),
        GateInput::AddNorm {
            x,
            residual,
            weight,
            eps,
            res_out,
            out,
        } => (
            x.ptr(),
            residual.ptr(),
            weight.ptr(),
            res_out.ptr(),
            out.ptr(),
            *eps,
            // as the norm launcher's block size (the sums must run the same way)
            super::elementwise::norm_threads(hidden) as i32,
            tokens * hidden * 2,
        ),
    };
    let xp = if add_x != 0 { 0 } else { xp };
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    b.arg(&xp)
        .arg(&w)
        .arg(&l)
        .arg(&cnt)
        .arg(&i)
        .arg(&wt)
        .arg(&t)
        .arg(&h)
        .arg(&e)
        .arg(&g)
        .arg(&tg)
        .arg(&k)
        .arg(&norm)
        .arg(&scale)
        .arg(&add_x)
        .arg(&add_res)
        .arg(&norm_w)
        .arg(&res_out)
        .arg(&x_out)
        .arg(&eps)
        .arg(&norm_threads);
    // GATE_EXPERTS (2) experts per block, GATE_SPLIT (4) warps each; the normed rows in dynamic
    // shared memory (at most 4 x 5120 bf16 = 40 KiB with the static 4.3 KiB: under 48 KiB)
    if smem + 4608 > 48 * 1024 {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!("{tokens} normed rows of {hidden} in shared memory"),
        });
    }
    let cfg = LaunchConfig {
        grid_dim: (n_exp.div_ceil(2) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: matches moe_gate_gemv_f32's signature; shapes and the kernel's limits checked
    // above; the counter is the caller's zeroed ticket (the kernel's last block re-zeroes it).
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// The permutation of one batch of routed tokens: `counts[e]` rows for expert e starting at
/// `offsets[e]`; `slot_of[t * k + j]` is the permuted row of assignment (t, j) (-1: not routed here);
/// `src_row[slot]` is its token.
pub struct Permutation {
    pub counts: Tensor<i32>,
    pub offsets: Tensor<i32>,
    pub slot_of: Tensor<i32>,
    pub src_row: Tensor<i32>,
    pub n_experts: usize,
    pub top_k: usize,
}

impl Permutation {
    /// The buffers of a permutation of `tokens` x top-`k` over `n_experts`, made by `make`
    /// (`Tensor::zeros` for the kernels that count into them, `Tensor::uninit` for one that
    /// writes every entry).
    fn alloc(
        gpu: &Gpu,
        n_experts: usize,
        tokens: usize,
        k: usize,
        make: fn(&Gpu, &[usize]) -> Result<Tensor<i32>>,
    ) -> Result<Self> {
        Ok(Permutation {
            counts: make(gpu, &[n_experts])?,
            offsets: make(gpu, &[n_experts + 1])?,
            slot_of: make(gpu, &[tokens, k])?,
            src_row: make(gpu, &[tokens * k])?,
            n_experts,
            top_k: k,
        })
    }
}

/// ids i32 [tokens, k] (values outside [0, n_experts) are not routed) -> a [`Permutation`]. Within
/// an expert, rows keep token order (deterministic).
pub struct PermuteParams<'a> {
    pub ids: View<'a, i32>,
    pub n_experts: usize,
}

/// Which kernels build a [`Permutation`]: count, offsets and scatter launches after memsets
/// (`Split`, every size), or one block for decode-sized routings (`Fused`,
/// `moe_permute_small_i32`: at most [`FUSED_PERMUTE_MAX_EXPERTS`] experts and
/// [`FUSED_PERMUTE_MAX_ASSIGN`] assignments; `Split` otherwise). The same outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PermuteKernel {
    Split,
    Fused,
}

/// Most experts the fused permutation takes (PERM_MAX_EXP in moe.cu).
pub const FUSED_PERMUTE_MAX_EXPERTS: usize = 256;
/// Most assignments (tokens x top-k) the fused permutation takes: one block walks them all, so
/// prefill-sized routings stay on the split kernels.
pub const FUSED_PERMUTE_MAX_ASSIGN: usize = 8192;

impl PermuteKernel {
    /// `DSV2_FUSED_PERMUTE=1`: the fused kernel where it fits (opt-in until measured on a GPU);
    /// unset or 0: split. Read once.
    pub fn from_env() -> Result<Self> {
        static CHOICE: std::sync::OnceLock<std::result::Result<PermuteKernel, String>> =
            std::sync::OnceLock::new();
        CHOICE
            .get_or_init(|| match std::env::var("DSV2_FUSED_PERMUTE").as_deref() {
                Err(_) | Ok("0") => Ok(PermuteKernel::Split),
                Ok("1") => Ok(PermuteKernel::Fused),
                Ok(other) => Err(format!("DSV2_FUSED_PERMUTE={other}: expected 0 or 1")),
            })
            .clone()
            .map_err(|what| KernelError::Unsupported {
                op: "moe_permute",
                what,
            })
    }

    /// Whether this kernel takes `n_assign` assignments over `n_experts` experts.
    pub fn fits(self, n_experts: usize, n_assign: usize) -> bool {
        match self {
            PermuteKernel::Split => true,
            PermuteKernel::Fused => {
                n_experts <= FUSED_PERMUTE_MAX_EXPERTS
                    && (1..=FUSED_PERMUTE_MAX_ASSIGN).contains(&n_assign)
            }
        }
    }
}

pub fn moe_permute(gpu: &Gpu, p: PermuteParams<'_>) -> Result<Permutation> {
    moe_permute_with(gpu, p, PermuteKernel::from_env()?)
}

/// [`moe_permute`] with the kernels named (the split ones where the fused one does not fit).
pub fn moe_permute_with(
    gpu: &Gpu,
    p: PermuteParams<'_>,
    kernel: PermuteKernel,
) -> Result<Permutation> {
    const OP: &str = "moe_permute";
    p.ids.expect(OP, "ids", &[None, None])?;
    let (tokens, k) = (p.ids.shape()[0], p.ids.shape()[1]);
    if p.n_experts == 0 || p.n_experts > 1024 {
        return Err(KernelError::Unsupported {
            op: OP,
            what: format!("{} experts (1..=1024)", p.n_experts),
        });
    }
    let n_assign = tokens * k;
    if kernel == PermuteKernel::Fused && kernel.fits(p.n_experts, n_assign) {
        // every entry is written by the kernel: no memsets
        let perm = Permutation::alloc(gpu, p.n_experts, tokens, k, Tensor::uninit)?;
        let (ids, counts, offsets, slot_of, src_row) = (
            p.ids.ptr(),
            perm.counts.ptr(),
            perm.offsets.ptr(),
            perm.slot_of.ptr(),
            perm.src_row.ptr(),
        );
        let (na, ki, ne) = (
            dim_i32(OP, "tokens * k", n_assign)?,
            dim_i32(OP, "k", k)?,
            p.n_experts as i32,
        );
        let f = gpu.function("moe_permute_small_i32")?;
        let mut b = gpu.launch(f);
        b.arg(&ids)
            .arg(&na)
            .arg(&ki)
            .arg(&ne)
            .arg(&counts)
            .arg(&offsets)
            .arg(&slot_of)
            .arg(&src_row);
        // SAFETY: matches moe_permute_small_i32(ids, n_assign, k, n_exp, counts, offsets,
        // slot_of, src_row); one block of 1024 threads; n_exp <= PERM_MAX_EXP (fits); counts
        // E, offsets E + 1, slot_of and src_row n_assign entries.
        unsafe { b.launch(per_row(1, 1024)) }?;
        return Ok(perm);
    }
    let perm = Permutation::alloc(gpu, p.n_experts, tokens, k, Tensor::zeros)?;
    let ids = p.ids.ptr();
    let na = dim_i32(OP, "tokens * k", n_assign)?;
    let ne = p.n_experts as i32;
    let ki = k as i32;
    let (counts, offsets, slot_of, src_row) = (
        perm.counts.ptr(),
        perm.offsets.ptr(),
        perm.slot_of.ptr(),
        perm.src_row.ptr(),
    );
    if n_assign > 0 {
        let f = gpu.function("moe_count_i32")?;
        let mut b = gpu.launch(f);
        b.arg(&ids).arg(&na).arg(&ne).arg(&counts);
        // SAFETY: matches moe_count_i32(ids, n_assign, n_exp, counts); counts zeroed, n_exp long.
        unsafe { b.launch(grid_for(n_assign, 256, (gpu.sm_count * 8) as u32)) }?;
    }
    let f = gpu.function("moe_offsets_i32")?;
    let mut b = gpu.launch(f);
    let rows_per_tile = 1i32;
    b.arg(&counts).arg(&ne).arg(&rows_per_tile).arg(&offsets);
    // SAFETY: matches moe_offsets_i32(counts, n_exp, bb, offsets); one block of 1024 >= n_exp
    // threads.
    unsafe { b.launch(per_row(1, 1024)) }?;
    if n_assign > 0 {
        let f = gpu.function("moe_scatter_i32")?;
        let mut b = gpu.launch(f);
        b.arg(&ids)
            .arg(&na)
            .arg(&ki)
            .arg(&offsets)
            .arg(&slot_of)
            .arg(&src_row);
        // SAFETY: matches moe_scatter_i32; grid = n_experts blocks (the kernel reads gridDim.x as
        // the expert count); slot_of has n_assign and src_row n_assign entries.
        unsafe { b.launch(per_row(p.n_experts, 512)) }?;
    }
    Ok(perm)
}

/// out[slot] = x[src_row[slot]] for the first `rows` permuted rows. x [tokens, hidden], out [rows, hidden].
pub struct GatherParams<'a> {
    pub x: View<'a, bf16>,
    pub src_row: View<'a, i32>,
    pub out: ViewMut<'a, bf16>,
}

pub fn moe_gather(gpu: &Gpu, p: GatherParams<'_>) -> Result<()> {
    const OP: &str = "moe_gather_bf16";
    p.x.expect(OP, "x", &[None, None])?;
    let hidden = p.x.shape()[1];
    p.out.expect(OP, "out", &[None, Some(hidden)])?;
    let rows = p.out.shape()[0];
    p.src_row.expect(OP, "src_row", &[None])?;
    if p.src_row.shape()[0] < rows {
        return Err(shape_err(
            OP,
            format!(
                "src_row has {} entries for {rows} rows",
                p.src_row.shape()[0]
            ),
        ));
    }
    if !hidden.is_multiple_of(8) {
        return Err(shape_err(
            OP,
            format!("hidden {hidden} not a multiple of 8"),
        ));
    }
    if rows == 0 {
        return Ok(());
    }
    let (x, s, o) = (p.x.ptr(), p.src_row.ptr(), p.out.ptr());
    let (r, h) = (dim_i32(OP, "rows", rows)?, dim_i32(OP, "hidden", hidden)?);
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    b.arg(&x).arg(&s).arg(&o).arg(&r).arg(&h);
    // SAFETY: matches moe_gather_bf16; src_row entries are token indices < x rows by construction
    // in moe_permute.
    unsafe { b.launch(per_row(rows, 128)) }?;
    Ok(())
}

/// out[t] = (accumulate ? out[t] : 0) + sum_j weights[t, j] * y[slot_of[t, j]].
/// y [rows, hidden], slot_of i32 [tokens, k], weights f32 [tokens, k], out [tokens, hidden].
pub struct CombineParams<'a> {
    pub y: View<'a, bf16>,
    pub slot_of: View<'a, i32>,
    pub weights: View<'a, f32>,
    pub out: ViewMut<'a, bf16>,
    pub accumulate: bool,
}

pub fn moe_combine(gpu: &Gpu, p: CombineParams<'_>) -> Result<()> {
    const OP: &str = "moe_combine_bf16";
    p.y.expect(OP, "y", &[None, None])?;
    let hidden = p.y.shape()[1];
    p.slot_of.expect(OP, "slot_of", &[None, None])?;
    let (tokens, k) = (p.slot_of.shape()[0], p.slot_of.shape()[1]);
    p.weights.expect(OP, "weights", &[Some(tokens), Some(k)])?;
    p.out.expect(OP, "out", &[Some(tokens), Some(hidden)])?;
    if !hidden.is_multiple_of(8) {
        return Err(shape_err(
            OP,
            format!("hidden {hidden} not a multiple of 8"),
        ));
    }
    if tokens == 0 {
        return Ok(());
    }
    let (y, s, w, o) = (p.y.ptr(), p.slot_of.ptr(), p.weights.ptr(), p.out.ptr());
    let (t, ki, h, acc) = (
        dim_i32(OP, "tokens", tokens)?,
        k as i32,
        hidden as i32,
        p.accumulate as i32,
    );
    let f = gpu.function(OP)?;
    let mut b = gpu.launch(f);
    b.arg(&y)
        .arg(&s)
        .arg(&w)
        .arg(&o)
        .arg(&t)
        .arg(&ki)
        .arg(&h)
        .arg(&acc);
    // SAFETY: matches moe_combine_bf16; slot_of values are < y rows (moe_permute) or -1.
    unsafe { b.launch(per_row(tokens, 128)) }?;
    Ok(())
}

#[cfg(test)]
mod gate_tests {
    use super::gate_fast_path;

    #[test]
    fn the_fast_gate_path_takes_the_deepseek_shapes_and_leaves_the_rest_to_the_general_one() {
        assert!(gate_fast_path(160, 8)); // V2: groups of 20 = 4 lanes of 5
        assert!(gate_fast_path(64, 1)); // V2-Lite
        assert!(gate_fast_path(256, 8)); // groups of 32 = 4 lanes of 8
        assert!(gate_fast_path(96, 8)); // groups of 12 = 4 lanes of 3
        assert!(!gate_fast_path(72, 4)); // not a multiple of 32
        assert!(!gate_fast_path(160, 5)); // groups of 32 = 6.4 lanes of 5
        assert!(!gate_fast_path(192, 3)); // groups of 64 = 10.7 lanes of 6
        assert!(gate_fast_path(160, 2)); // groups of 80 = 16 lanes of 5
        assert!(!gate_fast_path(288, 1)); // more than 256
    }
}

#[cfg(test)]
mod tests {
    use super::{FUSED_PERMUTE_MAX_ASSIGN, PermuteKernel};

    #[test]
    fn the_fused_permutation_takes_decode_sized_routings_only() {
        // V2 (160 experts) and V2-Lite (64) at batch 256 x top-6
        assert!(PermuteKernel::Fused.fits(160, 1536));
        assert!(PermuteKernel::Fused.fits(64, 1536));
        assert!(PermuteKernel::Fused.fits(256, FUSED_PERMUTE_MAX_ASSIGN));
        // more experts than its shared table, a prefill-sized routing, nothing to permute
        assert!(!PermuteKernel::Fused.fits(257, 6));
        assert!(!PermuteKernel::Fused.fits(160, 8192 * 6));
        assert!(!PermuteKernel::Fused.fits(160, 0));
        assert!(PermuteKernel::Split.fits(1024, 8192 * 6));
    }
}
