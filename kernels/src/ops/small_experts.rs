//! Routed experts for a few rows (decode at small batch) in two launches, reading each row's
//! expert weights through a device pointer table: `moe_small_gate_up_bf16` then
//! `moe_small_down_bf16` (moe.cu). The permuted path (`moe_permute` → gather → one cuBLAS call per
//! expert and projection → combine) launches ~25 kernels for the 6 GEMVs of one decode token; this
//! path reads the same weights once per (row, slot), so it only pays off while rows × top-k is
//! small compared with the number of experts (see `SMALL_EXPERTS_MAX_ROWS`).

use std::sync::OnceLock;

use cudarc::driver::{CudaEvent, LaunchConfig};
use half::bf16;

use super::dim_i32;
use crate::device::Gpu;
use crate::error::{Result, shape_err};
use crate::tensor::{View, ViewMut};

/// Up to this many rows the backends take the two-launch path (each row reads its 6 experts'
/// weights itself; beyond a few rows shared experts would be read repeatedly).
pub const SMALL_EXPERTS_MAX_ROWS: usize = 4;

/// Largest dynamic shared memory the kernels ask for without raising the function's limit.
const SMEM_LIMIT: usize = 48 * 1024;

/// x [n, H]; ids [n, k] (expert ids, -1 = not routed here); weights [n, k] (f32 routing weights);
/// ptrs [E, 3] device addresses of expert e's gate [I, H], up [I, H] and down [H, I] (bf16,
/// row-major; 0 for experts this process does not hold: their slots contribute nothing); act
/// [n * (k + S), I] workspace (S = the shared parts, 0 without `shared`);
/// out [n, H] = Σ_j weights[r, j] · FFN_{ids[r, j]}(x[r]) (+ the shared MLP of x[r]).
pub struct SmallExpertsParams<'a> {
    pub x: View<'a, bf16>,
    pub ids: View<'a, i32>,
    pub weights: View<'a, f32>,
    pub ptrs: View<'a, i64>,
    pub act: ViewMut<'a, bf16>,
    pub out: ViewMut<'a, bf16>,
    pub shared: Option<SharedMlp<'a>>,
    /// With `shared`: the shared parts' activations (act's last n · S rows: row r's S · I
    /// values in a row, the layout of the shared MLP's own SiLU·mul output) are written on
    /// another stream until this event (the shared gate/up beside the gate and the routed
    /// gate/up). The gate/up launch then takes the routed slots alone, and the main stream
    /// waits for the event before the down projection, which takes every slot as usual.
    pub shared_beside: Option<&'a CudaEvent>,
}

/// The shared experts computed in the same two launches: gate and up [S * I, H], down [H, S * I]
/// (the checkpoint's one shared MLP whose intermediate size is S times the routed experts'),
/// taken as S more slots of weight 1 per row.
pub struct SharedMlp<'a> {
    pub gate: View<'a, bf16>,
    pub up: View<'a, bf16>,
    pub down: View<'a, bf16>,
}

/// How many routed-size parts a shared MLP of intermediate size `shared_inter` makes for
/// experts of intermediate size `inter`: None when it does not split evenly (the caller then
/// runs the shared MLP on its own).
pub fn shared_parts(shared_inter: usize, inter: usize) -> Option<usize> {
    (inter > 0 && shared_inter > 0 && shared_inter.is_multiple_of(inter))
        .then(|| shared_inter / inter)
}

/// # Safety
/// `shared`, when given, is shape-checked here. For every expert id in `ids` within 0..E (others are skipped), its three addresses in `ptrs`
/// must be 0 or point to live bf16 tensors of shapes [I, H], [I, H] and [H, I] (I = act's width) that outlive
/// the launches (stream order). The kernels trust the table: they cannot check it.
pub unsafe fn small_experts(gpu: &Gpu, p: SmallExpertsParams<'_>) -> Result<()> {
    // SAFETY: the caller's contract, passed on.
    unsafe { small_experts_with(gpu, p, SmallDown::from_env()?) }
}

/// How the down projection is cut: one warp per slot over a run of output rows with the next
/// rows' weight loads in flight (`moe_small_down_pipe_bf16`, the default where a slot's
/// activation is one pass of the warp, intermediate <= [`DOWN_PIPE_MAX_INTER`]; V2 and V2-Lite
/// both fit), one warp per slot and two output rows a block (`moe_small_down_slots_bf16`,
/// `DSV2_SMALL_DOWN=slots`, and where the pipelined kernel does not fit: it took V2-Lite's
/// batch-1 step from 1.94x to 1.79x its roofline, bench/RESULTS.md session 15, but ran at 0.70
/// of the copy bandwidth, session 16) or one warp per output row walking its row's slots in turn
/// (`moe_small_down_bf16`, `DSV2_SMALL_DOWN=rows`; also where a row has more slots than the slot
/// kernels take).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmallDown {
    Pipe,
    Slots,
    Rows,
}

/// Largest intermediate size the pipelined down kernel takes: one pass of a warp's loads
/// (WARP * 8 * DOWN_PIECES in moe.cu).
pub const DOWN_PIPE_MAX_INTER: usize = 32 * 8 * 6;
/// Most slots the pipelined down kernel takes: one warp each, 256 threads at most
/// (its `__launch_bounds__(256, 2)`).
const DOWN_PIPE_MAX_SLOTS: usize = 8;
/// Most output rows one block of the pipelined down kernel computes (DOWN_PIPE_MAX_ROWS).
const DOWN_PIPE_MAX_ROWS: usize = 64;

/// Output rows per block of the pipelined down kernel for `n` rows of `hidden` outputs on
/// `sm_count` SMs: about two blocks per SM in all (the kernel's residency), so that the grid is
/// one wave and each block's warps stream their rows back to back. None where one wave would
/// need more than DOWN_PIPE_MAX_ROWS rows a block: V2 at 4 rows (5120 x 4 outputs) ran as 1.2
/// waves of 64-row blocks and its batch-4 step was 2 % slower than with the slot kernel, which
/// then takes it (bench/RESULTS.md, session 17).
fn down_pipe_rows(hidden: usize, n: usize, sm_count: usize) -> Option<usize> {
    let blocks = (2 * sm_count.max(1)).div_ceil(n.max(1)).max(1);
    let rows = hidden.div_ceil(blocks).max(1);
    (rows <= DOWN_PIPE_MAX_ROWS).then_some(rows)
}

/// Most slots (top-k + shared parts) of a row the slot-per-warp down kernel takes (one warp each;
/// DOWN_MAX_SLOTS in moe.cu).
const DOWN_MAX_SLOTS: usize = 16;
/// Output rows one block of the slot-per-warp down kernel computes (DOWN_ROWS in moe.cu).
const DOWN_ROWS: usize = 2;

impl SmallDown {
    /// Whether this down kernel takes rows of `slots` slots (top-k + shared parts) of
    /// intermediate size `inter`: one warp per slot, or the row's activations in shared memory.
    pub fn fits(self, slots: usize, inter: usize) -> bool {
        match self {
            SmallDown::Pipe => slots <= DOWN_PIPE_MAX_SLOTS && inter <= DOWN_PIPE_MAX_INTER,
            SmallDown::Slots => slots <= DOWN_MAX_SLOTS,
            SmallDown::Rows => slots * inter * 2 <= SMEM_LIMIT,
        }
    }

    /// The down kernel that runs for `n` rows of `hidden` outputs over `slots` slots of
    /// intermediate size `inter` on `sm_count` SMs when this one is asked for: the pipelined
    /// kernel falls back to the slot kernel where it does not fit or one wave of blocks cannot
    /// hold every output row; None where the kernel asked for does not take the shape.
    pub fn runs_as(
        self,
        n: usize,
        hidden: usize,
        slots: usize,
        inter: usize,
        sm_count: usize,
    ) -> Option<SmallDown> {
        let down = if self == SmallDown::Pipe
            && (!self.fits(slots, inter) || down_pipe_rows(hidden, n, sm_count).is_none())
        {
            SmallDown::Slots
        } else {
            self
        };
        down.fits(slots, inter).then_some(down)
    }

    /// `DSV2_SMALL_DOWN` (pipe | slots | rows; unset: pipe).
    pub fn from_env() -> Result<Self> {
        static CHOICE: OnceLock<std::result::Result<SmallDown, String>> = OnceLock::new();
        CHOICE
            .get_or_init(|| match std::env::var("DSV2_SMALL_DOWN").as_deref() {
                Err(_) | Ok("pipe") => Ok(SmallDown::Pipe),
                Ok("slots") => Ok(SmallDown::Slots),
                Ok("rows") => Ok(SmallDown::Rows),
                Ok(other) => Err(format!(
                    "DSV2_SMALL_DOWN={other}: expected pipe, slots or rows"
                )),
            })
            .clone()
            .map_err(|what| crate::error::KernelError::Unsupported {
                op: "moe_small_experts_bf16",
                what,
            })
    }
}

/// [`small_experts`] with the down kernel named.
///
/// # Safety
/// As [`small_experts`].
pub unsafe fn small_experts_with(
    gpu: &Gpu,
    p: SmallExpertsParams<'_>,
    down: SmallDown,
) -> Result<()> {
    const OP: &str = "moe_small_experts_bf16";
    p.x.expect(OP, "x", &[None, None])?;
    let (n, hidden) = (p.x.shape()[0], p.x.shape()[1]);
    p.ids.expect(OP, "ids", &[Some(n), None])?;
    let k = p.ids.shape()[1];
    p.weights.expect(OP, "weights", &[Some(n), Some(k)])?;
    p.ptrs.expect(OP, "ptrs", &[None, Some(3)])?;
    let inter = p.act.shape().get(1).copied().unwrap_or(0);
    let n_shared = match &p.shared {
        None => 0,
        Some(s) => {
            s.gate.expect(OP, "shared gate", &[None, Some(hidden)])?;
            let si = s.gate.shape()[0];
            s.up.expect(OP, "shared up", &[Some(si), Some(hidden)])?;
            s.down
                .expect(OP, "shared down", &[Some(hidden), Some(si)])?;
            shared_parts(si, inter).ok_or_else(|| crate::error::KernelError::Unsupported {
                op: OP,
                what: format!("shared intermediate {si} is not a multiple of {inter}"),
            })?
        }
    };
    p.act
        .expect(OP, "act", &[Some(n * (k + n_shared)), Some(inter)])?;
    p.out.expect(OP, "out", &[Some(n), Some(hidden)])?;
    if !hidden.is_multiple_of(8) || !inter.is_multiple_of(8) {
        return Err(crate::error::KernelError::Unsupported {
            op: OP,
            what: format!("hidden {hidden} / intermediate {inter} not multiples of 8"),
        });
    }
    let Some(down) = down.runs_as(n, hidden, k + n_shared, inter, gpu.sm_count) else {
        return Err(crate::error::KernelError::Unsupported {
            op: OP,
            what: format!(
                "top-k {k} (+ {n_shared} shared) slots of intermediate {inter} with the {down:?} down kernel"
            ),
        });
    };
    if hidden * 2 > SMEM_LIMIT {
        return Err(crate::error::KernelError::Unsupported {
            op: OP,
            what: format!("hidden {hidden} exceeds 48 KiB of shared memory"),
        });
    }
    if p.shared_beside.is_some() && n_shared == 0 {
        return Err(shape_err(
            OP,
            "shared activations written beside, but no shared experts given",
        ));
    }
    if n == 0 || k + n_shared == 0 {
        if let Some(event) = p.shared_beside {
            gpu.stream.wait(event)?;
        }
        return Ok(());
    }
    let (sg, su, sd) = match &p.shared {
        Some(s) => (s.gate.ptr(), s.up.ptr(), s.down.ptr()),
        None => (0, 0, 0),
    };
    let (x, ids, w, ptrs, act, out) = (
        p.x.ptr(),
        p.ids.ptr(),
        p.weights.ptr(),
        p.ptrs.ptr(),
        p.act.ptr(),
        p.out.ptr(),
    );
    let (h, i, ki, ne, ns) = (
        dim_i32(OP, "hidden", hidden)?,
        dim_i32(OP, "intermediate", inter)?,
        dim_i32(OP, "top_k", k)?,
        dim_i32(OP, "experts", p.ptrs.shape()[0])?,
        dim_i32(OP, "shared parts", n_shared)?,
    );
    let routed_only = i32::from(p.shared_beside.is_some());
    let gate_up_slots = if routed_only == 1 {
        n * k
    } else {
        n * (k + n_shared)
    };
    let slots = u32::try_from(gate_up_slots)
        .map_err(|_| shape_err(OP, format!("{n} x {k} (+ {n_shared}) slots")))?;
    let f = gpu.function("moe_small_gate_up_bf16")?;
    let mut b = gpu.launch(f);
    b.arg(&x)
        .arg(&ids)
        .arg(&ptrs)
        .arg(&act)
        .arg(&h)
        .arg(&i)
        .arg(&ki)
        .arg(&ne)
        .arg(&sg)
        .arg(&su)
        .arg(&ns)
        .arg(&routed_only);
    let cfg = LaunchConfig {
        grid_dim: (inter.div_ceil(8) as u32, slots, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: (hidden * 2) as u32,
    };
    if slots > 0 {
        // SAFETY: matches moe_small_gate_up_bf16; shapes checked above, the table per the
        // contract; with routed_only the grid covers the routed slots alone.
        unsafe { b.launch(cfg) }?;
    }
    if let Some(event) = p.shared_beside {
        gpu.stream.wait(event)?;
    }
    let rpb = down_pipe_rows(hidden, n, gpu.sm_count).unwrap_or(1);
    let (name, grid_x, threads, smem) = match down {
        SmallDown::Pipe => (
            "moe_small_down_pipe_bf16",
            hidden.div_ceil(rpb),
            32 * (k + n_shared),
            0,
        ),
        SmallDown::Slots => (
            "moe_small_down_slots_bf16",
            hidden.div_ceil(DOWN_ROWS),
            32 * (k + n_shared),
            0,
        ),
        SmallDown::Rows => (
            "moe_small_down_bf16",
            hidden.div_ceil(8),
            256,
            (k + n_shared) * inter * 2,
        ),
    };
    let f = gpu.function(name)?;
    let mut b = gpu.launch(f);
    b.arg(&act)
        .arg(&ids)
        .arg(&w)
        .arg(&ptrs)
        .arg(&out)
        .arg(&h)
        .arg(&i)
        .arg(&ki)
        .arg(&ne)
        .arg(&sd)
        .arg(&ns);
    // the pipelined kernel's rows per block (the others ignore the extra argument: not passed)
    let rpb_i = rpb as i32;
    if down == SmallDown::Pipe {
        b.arg(&rpb_i);
    }
    let cfg = LaunchConfig {
        grid_dim: (grid_x as u32, n as u32, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: the down kernels take the same arguments (the pipelined one also rows per block,
    // <= DOWN_PIPE_MAX_ROWS, its grid covering hidden); act rows of routed slots were written
    // just before; the slot kernels' blocks have one warp per slot (at most DOWN_MAX_SLOTS).
    unsafe { b.launch(cfg) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{DOWN_PIPE_MAX_ROWS, SmallDown, down_pipe_rows};

    #[test]
    fn pipelined_down_grid_is_about_one_wave() {
        // V2-Lite (hidden 2048) and V2 (5120) at 1 and 4 rows on an H100's 132 SMs
        assert_eq!(down_pipe_rows(2048, 1, 132), Some(8)); // 256 blocks
        assert_eq!(down_pipe_rows(5120, 1, 132), Some(20)); // 256 blocks
        assert_eq!(down_pipe_rows(2048, 4, 132), Some(32)); // 64 x 4 blocks
        // V2 at 4 rows would need 78 rows a block: the slot kernel takes it
        assert_eq!(down_pipe_rows(5120, 4, 132), None);
        // tiny shapes and a GPU whose SM count is unknown still get a valid grid
        assert_eq!(down_pipe_rows(72, 3, 132), Some(1));
        assert_eq!(down_pipe_rows(8, 1, 0), Some(4));
        for (h, n) in [(2048, 1), (5120, 1), (72, 2), (1, 1)] {
            let r = down_pipe_rows(h, n, 132).unwrap_or(0);
            assert!((1..=DOWN_PIPE_MAX_ROWS).contains(&r));
        }
    }

    #[test]
    fn pipelined_down_takes_v2_and_lite_and_leaves_the_rest_to_the_slot_kernel() {
        // top-6 + 2 shared parts at V2's and V2-Lite's intermediate sizes
        assert!(SmallDown::Pipe.fits(8, 1536));
        assert!(SmallDown::Pipe.fits(8, 1408));
        // more slots than 8 warps, or an activation longer than one pass
        assert!(!SmallDown::Pipe.fits(10, 40));
        assert!(!SmallDown::Pipe.fits(4, 2056));
        assert!(SmallDown::Slots.fits(10, 40));
        assert!(SmallDown::Slots.fits(4, 2056));
        // what runs: V2 at 4 rows needs more than one wave of pipelined blocks
        assert_eq!(
            SmallDown::Pipe.runs_as(1, 5120, 8, 1536, 132),
            Some(SmallDown::Pipe)
        );
        assert_eq!(
            SmallDown::Pipe.runs_as(4, 5120, 8, 1536, 132),
            Some(SmallDown::Slots)
        );
        assert_eq!(
            SmallDown::Pipe.runs_as(2, 72, 10, 40, 132),
            Some(SmallDown::Slots)
        );
        assert_eq!(SmallDown::Slots.runs_as(2, 72, 17, 40, 132), None);
    }
}
