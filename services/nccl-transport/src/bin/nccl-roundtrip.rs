//! `nccl-roundtrip`: one MoE layer's round trip over the NCCL data plane, router on one GPU and
//! one shard on another. By default the shard runs as a second process (as `dsv2-expert` does);
//! `--threads` runs both ranks as threads of one process instead. Dispatch rows + expert ids + gate weights, combine partials, at hidden 5120 bf16.
//!
//! Per row count, two modes (selected by the header's layer index, so the same protocol runs):
//! - `echo` (layer 0): the shard copies the rows it received into its partials: expert compute
//!   EXCLUDED, and the router can check both directions bitwise (partials == rows sent);
//! - `ffn` (layer 1): the shard runs the kernels crate's grouped expert FFN (moe_permute,
//!   moe_gather, expert_ffn, moe_combine) over random weights: compute INCLUDED.
//!
//! Before timing each (rows, mode), one exchange is captured on the shard (rows, ids, weights it
//! received and the partials it computed, copied to the host) and compared bitwise with what the
//! router sent and received (between processes the capture travels as a file in a temporary
//! directory). A final echo of `--bw-rows` rows gives the bandwidth ceiling of the
//! same path, measured in the same run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use dsv2_kernels::ops::{expert, moe};
use dsv2_kernels::{Gpu, GpuOptions, Tensor};
use dsv2_nccl::{
    BatchBuffers, Header, LayerSet, PlaneConfig, RouterPlane, ShardCompute, ShardPart, ShardPlane,
    UniqueId,
};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "nccl-roundtrip",
    about = "Time one MoE-layer round trip over NCCL (router GPU -> shard GPU -> router)"
)]
struct Args {
    #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
    rows: Vec<usize>,
    #[arg(long, default_value_t = 5120)]
    hidden: usize,
    /// Experts on the shard (global ids 0..experts).
    #[arg(long, default_value_t = 80)]
    experts: usize,
    #[arg(long, default_value_t = 1536)]
    inter: usize,
    #[arg(long, default_value_t = 6)]
    top_k: usize,
    #[arg(long, default_value_t = 300)]
    iters: usize,
    #[arg(long, default_value_t = 30)]
    warmup: usize,
    #[arg(long, default_value_t = 0)]
    router_gpu: usize,
    #[arg(long, default_value_t = 1)]
    shard_gpu: usize,
    /// Rows of the bandwidth-ceiling echo (0: skip).
    #[arg(long, default_value_t = 16384)]
    bw_rows: usize,
    #[arg(long, default_value_t = 20000)]
    timeout_ms: u64,
    /// Both ranks as threads of this process (default: the shard is a child process).
    #[arg(long)]
    threads: bool,
    /// Blocking-mode communicator (split after init); also DSV2_NCCL_BLOCKING=1.
    #[arg(long)]
    blocking: bool,
    /// Decode slots of this many rows (0: off). Then only echo runs, for the row counts up to
    /// it, each one slot exchange (RouterPlane::exchange_slot) waited for with `sync`.
    #[arg(long, default_value_t = 0)]
    slot_rows: usize,
    /// Internal: run as the shard child process with this NCCL id (hex) and capture directory.
    #[arg(long, hide = true, num_args = 2, value_names = ["ID_HEX", "DIR"])]
    shard_child: Option<Vec<String>>,
}

/// Where the shard delivers its captures: the router thread, or files for the router process.
enum CaptureSink {
    /// Thread mode: the router sets the flag before a verification exchange.
    Channel(Arc<AtomicBool>, mpsc::Sender<Captured>),
    /// Process mode: the first exchange of every (layer, rows) is the router's verification
    /// exchange; it is written to `DIR/cap-LAYER-ROWS.bin` (temp file + rename).
    Dir(std::path::PathBuf, std::collections::HashSet<(u32, usize)>),
}

/// Where the router reads the shard's captures.
enum CaptureSource {
    Channel(Arc<AtomicBool>, mpsc::Receiver<Captured>),
    Dir(std::path::PathBuf),
}

impl CaptureSource {
    fn arm(&self) {
        if let CaptureSource::Channel(flag, _) = self {
            flag.store(true, Ordering::SeqCst);
        }
    }

    fn take(&self, layer: u32, rows: usize) -> Result<Captured> {
        match self {
            CaptureSource::Channel(_, rx) => rx
                .recv_timeout(Duration::from_secs(60))
                .context("shard capture"),
            CaptureSource::Dir(dir) => {
                let path = dir.join(format!("cap-{layer}-{rows}.bin"));
                let t0 = Instant::now();
                while !path.exists() {
                    if t0.elapsed() > Duration::from_secs(60) {
                        bail!("no capture from the shard process at {}", path.display());
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Captured::read(&path)
            }
        }
    }
}

impl Captured {
    fn write(&self, path: &std::path::Path) -> Result<()> {
        let mut b: Vec<u8> = Vec::new();
        for v in [
            self.layer as u64,
            self.rows as u64,
            self.x.len() as u64,
            self.ids.len() as u64,
            self.weights.len() as u64,
            self.partial.len() as u64,
        ] {
            b.extend(v.to_le_bytes());
        }
        b.extend(self.x.iter().flat_map(|v| v.to_bits().to_le_bytes()));
        b.extend(self.ids.iter().flat_map(|v| v.to_le_bytes()));
        b.extend(self.weights.iter().flat_map(|v| v.to_le_bytes()));
        b.extend(self.partial.iter().flat_map(|v| v.to_bits().to_le_bytes()));
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, b)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    fn read(path: &std::path::Path) -> Result<Captured> {
        let b = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        let word = |i: usize| -> Result<usize> {
            let s = b.get(i * 8..i * 8 + 8).context("capture file too short")?;
            Ok(u64::from_le_bytes(s.try_into()?) as usize)
        };
        let (layer, rows) = (word(0)? as u32, word(1)?);
        let (nx, ni, nw, np) = (word(2)?, word(3)?, word(4)?, word(5)?);
        let mut off = 48;
        let mut take = |n: usize| -> Result<&[u8]> {
            let s = b.get(off..off + n).context("capture file too short")?;
            off += n;
            Ok(s)
        };
        let x = take(nx * 2)?
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
            .collect();
        let ids = take(ni * 4)?
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let weights = take(nw * 4)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let partial = take(np * 2)?
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
            .collect();
        Ok(Captured {
            layer,
            rows,
            x,
            ids,
            weights,
            partial,
        })
    }
}

const LAYER_ECHO: u32 = 0;
const LAYER_FFN: u32 = 1;

/// What the shard saw and computed in a captured exchange.
struct Captured {
    layer: u32,
    rows: usize,
    x: Vec<bf16>,
    ids: Vec<i32>,
    weights: Vec<f32>,
    partial: Vec<bf16>,
}

struct BenchShard {
    gpu: Gpu,
    hidden: usize,
    x: Tensor<bf16>,
    ids: Tensor<i32>,
    w: Tensor<f32>,
    partial: Tensor<bf16>,
    gate_up: Tensor<bf16>,
    down: Tensor<bf16>,
    xp: Tensor<bf16>,
    gu: Tensor<bf16>,
    act: Tensor<bf16>,
    y: Tensor<bf16>,
    ffn_rows: usize,
    n_exp: usize,
    capture: CaptureSink,
}

fn fill_random(gpu: &Gpu, t: &mut Tensor<bf16>, scale: f32, seed: u64) -> Result<()> {
    // One 32 MiB random block tiled over the tensor: random enough for timing, fast to make.
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let block: Vec<bf16> = (0..(16usize << 20))
        .map(|_| bf16::from_f32(rng.random_range(-scale..scale)))
        .collect();
    let n = t.len();
    let mut off = 0;
    while off < n {
        let m = block.len().min(n - off);
        let mut dst = t.buf_mut().slice_mut(off..off + m);
        gpu.stream.memcpy_htod(&block[..m], &mut dst)?;
        off += m;
    }
    gpu.sync()?;
    Ok(())
}

impl BenchShard {
    fn new(a: &Args, max_rows: usize, capture: CaptureSink) -> Result<Self> {
        let gpu = Gpu::open(&GpuOptions {
            ordinal: a.shard_gpu,
            ..Default::default()
        })?;
        let (h, k, e, i) = (a.hidden, a.top_k, a.experts, a.inter);
        let ffn_rows = a.rows.iter().copied().max().unwrap_or(1) * k;
        let mut gate_up = Tensor::zeros(&gpu, &[e, 2 * i, h])?;
        let mut down = Tensor::zeros(&gpu, &[e, h, i])?;
        fill_random(&gpu, &mut gate_up, 1.0 / (h as f32).sqrt(), 1)?;
        fill_random(&gpu, &mut down, 1.0 / (i as f32).sqrt(), 2)?;
        Ok(BenchShard {
            hidden: h,
            x: Tensor::zeros(&gpu, &[max_rows, h])?,
            ids: Tensor::zeros(&gpu, &[max_rows, k])?,
            w: Tensor::zeros(&gpu, &[max_rows, k])?,
            partial: Tensor::zeros(&gpu, &[max_rows, h])?,
            xp: Tensor::zeros(&gpu, &[ffn_rows, h])?,
            gu: Tensor::zeros(&gpu, &[ffn_rows, 2 * i])?,
            act: Tensor::zeros(&gpu, &[ffn_rows, i])?,
            y: Tensor::zeros(&gpu, &[ffn_rows, h])?,
            gate_up,
            down,
            ffn_rows,
            n_exp: e,
            capture,
            gpu,
        })
    }

    /// Grouped expert FFN of the received rows; `ids`/`w` have the run's k columns.
    fn ffn(&mut self, rows: usize) -> Result<()> {
        let gpu = &self.gpu;
        let perm = moe::moe_permute(
            gpu,
            moe::PermuteParams {
                ids: self.ids.view().narrow(0, 0, rows)?,
                n_experts: self.n_exp,
            },
        )?;
        // host needs the per-expert counts to size the GEMMs (as in dsv2-cuda-backend)
        let counts: Vec<usize> = perm
            .counts
            .to_host(gpu)?
            .iter()
            .map(|&c| c.max(0) as usize)
            .collect();
        let total: usize = counts.iter().sum();
        if total > self.ffn_rows {
            bail!(
                "{total} routed rows exceed the workspace ({})",
                self.ffn_rows
            );
        }
        if total > 0 {
            moe::moe_gather(
                gpu,
                moe::GatherParams {
                    x: self.x.view().narrow(0, 0, rows)?,
                    src_row: perm.src_row.view(),
                    out: self.xp.view_mut().narrow(0, 0, total)?,
                },
            )?;
            expert::expert_ffn(
                gpu,
                expert::ExpertFfnParams {
                    x: self.xp.view().narrow(0, 0, total)?,
                    gate_up: self.gate_up.view(),
                    down: self.down.view(),
                    counts: &counts,
                    gu: self.gu.view_mut().narrow(0, 0, total)?,
                    act: self.act.view_mut().narrow(0, 0, total)?,
                    out: self.y.view_mut().narrow(0, 0, total)?,
                },
            )?;
        }
        moe::moe_combine(
            gpu,
            moe::CombineParams {
                y: self
                    .y
                    .view()
                    .narrow(0, 0, total.max(1).min(self.ffn_rows))?,
                slot_of: perm.slot_of.view(),
                weights: self.w.view().narrow(0, 0, rows)?,
                out: self.partial.view_mut().narrow(0, 0, rows)?,
                accumulate: false,
            },
        )?;
        Ok(())
    }
}

fn copy_dev(gpu: &Gpu, src: u64, dst: u64, bytes: usize) -> Result<()> {
    use cudarc::driver::sys as cu;
    // SAFETY: both addresses are live device buffers of at least `bytes` bytes (checked shapes).
    let r = unsafe { cu::cuMemcpyDtoDAsync_v2(dst, src, bytes, gpu.stream.cu_stream()) };
    if r != cu::CUresult::CUDA_SUCCESS {
        bail!("cuMemcpyDtoDAsync: {r:?}");
    }
    Ok(())
}

// SAFETY: the buffers are this struct's own tensors on the plane's device (the plane's stream is
// gpu.stream), sized max_rows x hidden / k, and live as long as the struct.
unsafe impl ShardCompute for BenchShard {
    fn buffers(&mut self, h: &Header) -> std::result::Result<BatchBuffers, String> {
        let (rows, k) = (h.rows as usize, h.k as usize);
        if rows > self.x.shape()[0] || k != self.ids.shape()[1] {
            return Err(format!(
                "batch {rows} x k {k} does not fit {:?}",
                self.ids.shape()
            ));
        }
        Ok(BatchBuffers {
            x: self.x.ptr(),
            ids: self.ids.ptr(),
            weights: self.w.ptr(),
            partial: self.partial.ptr(),
        })
    }

    fn compute(&mut self, h: &Header) -> std::result::Result<(), String> {
        let rows = h.rows as usize;
        let r = match h.layer {
            LAYER_ECHO => copy_dev(
                &self.gpu,
                self.x.ptr(),
                self.partial.ptr(),
                rows * self.hidden * 2,
            ),
            LAYER_FFN => self.ffn(rows),
            l => Err(anyhow!("no layer {l} in this benchmark")),
        };
        r.map_err(|e| format!("{e:#}"))?;
        let want = match &mut self.capture {
            CaptureSink::Channel(flag, _) => flag.swap(false, Ordering::SeqCst),
            CaptureSink::Dir(_, seen) => seen.insert((h.layer, rows)),
        };
        if want {
            let c = (|| -> Result<Captured> {
                let gpu = &self.gpu;
                let (hh, kk) = (self.hidden, self.ids.shape()[1]);
                let mut x = self.x.to_host(gpu)?;
                x.truncate(rows * hh);
                let mut ids = self.ids.to_host(gpu)?;
                ids.truncate(rows * kk);
                let mut weights = self.w.to_host(gpu)?;
                weights.truncate(rows * kk);
                let mut partial = self.partial.to_host(gpu)?;
                partial.truncate(rows * hh);
                Ok(Captured {
                    layer: h.layer,
                    rows,
                    x,
                    ids,
                    weights,
                    partial,
                })
            })()
            .map_err(|e| format!("capture: {e:#}"))?;
            match &self.capture {
                CaptureSink::Channel(_, tx) => tx
                    .send(c)
                    .map_err(|_| "capture receiver gone".to_string())?,
                CaptureSink::Dir(dir, _) => c
                    .write(&dir.join(format!("cap-{}-{rows}.bin", h.layer)))
                    .map_err(|e| format!("capture file: {e:#}"))?,
            }
        }
        Ok(())
    }
}

struct Stat {
    med: f64,
    p10: f64,
    p90: f64,
    min: f64,
}

fn stat(mut v: Vec<f64>) -> Stat {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Stat {
        med: at(0.5),
        p10: at(0.1),
        p90: at(0.9),
        min: v[0],
    }
}

fn bits16(v: &[bf16]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn main() -> Result<()> {
    let a = Args::parse();
    if std::env::var("NCCL_NVLS_ENABLE").as_deref() != Ok("0") {
        bail!("set NCCL_NVLS_ENABLE=0 (NVLink multicast must stay off on the shared hosts)");
    }
    let n = dsv2_nccl::device_count();
    if a.router_gpu == a.shard_gpu || a.router_gpu.max(a.shard_gpu) >= n {
        bail!(
            "needs two distinct GPUs (router {}, shard {}); {n} visible",
            a.router_gpu,
            a.shard_gpu
        );
    }
    if a.top_k == 0 || a.top_k > a.experts {
        bail!("--top-k must be in 1..={}", a.experts);
    }
    let (h, k) = (a.hidden, a.top_k);
    let max_rows = a.rows.iter().copied().max().unwrap_or(1).max(a.bw_rows);
    let cfg = PlaneConfig {
        hidden: h,
        max_rows,
        max_k: k,
        timeout: Duration::from_millis(a.timeout_ms),
        blocking: a.blocking || std::env::var("DSV2_NCCL_BLOCKING").is_ok_and(|v| v == "1"),
        slot_rows: a.slot_rows,
        moe_layers: LayerSet::from_layers([LAYER_ECHO as usize])?,
    };
    println!(
        "communicator: {}; slots: {}",
        if cfg.blocking {
            "blocking"
        } else {
            "non-blocking"
        },
        if a.slot_rows > 0 {
            format!("{} rows", a.slot_rows)
        } else {
            "off".into()
        }
    );
    let mut ver = 0i32;
    // SAFETY: valid out-pointer; libnccl is present (device_count checked it).
    unsafe { cudarc::nccl::sys::ncclGetVersion(&mut ver) };
    println!(
        "NCCL {ver}, GPUs visible {n}, router GPU {} shard GPU {}, hidden {h}, k {k}, shard experts {} x inter {}",
        a.router_gpu, a.shard_gpu, a.experts, a.inter
    );

    if let Some(child) = &a.shard_child {
        let id = UniqueId::from_bytes(&hex_decode(&child[0])?)?;
        let stop = Arc::new(AtomicBool::new(false));
        let sink = CaptureSink::Dir(child[1].clone().into(), Default::default());
        return run_shard(&a, max_rows, cfg, id, sink, &stop);
    }

    let id = UniqueId::new()?;
    let stop = Arc::new(AtomicBool::new(false));
    let cap_dir = std::env::temp_dir().join(format!("nccl-roundtrip.{}", std::process::id()));
    let (capture, shard): (CaptureSource, ShardHandle) = if a.threads {
        let flag = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<Captured>();
        let (a2, stop2) = (a.clone(), stop.clone());
        let sink = CaptureSink::Channel(flag.clone(), tx);
        let t = std::thread::spawn(move || run_shard(&a2, max_rows, cfg, id, sink, &stop2));
        (CaptureSource::Channel(flag, rx), ShardHandle::Thread(t))
    } else {
        std::fs::create_dir_all(&cap_dir)?;
        let child = std::process::Command::new(std::env::current_exe()?)
            .args(std::env::args().skip(1))
            .arg("--shard-child")
            .arg(hex_encode(&id.0))
            .arg(&cap_dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("start the shard process")?;
        (
            CaptureSource::Dir(cap_dir.clone()),
            ShardHandle::Process(child),
        )
    };
    let result = run_router(&a, cfg, id, &capture, &stop, shard);
    if !a.threads {
        let _ = std::fs::remove_dir_all(&cap_dir);
    }
    result
}

enum ShardHandle {
    Thread(std::thread::JoinHandle<Result<()>>),
    Process(std::process::Child),
}

impl ShardHandle {
    fn join(self) -> Result<()> {
        match self {
            ShardHandle::Thread(t) => t.join().map_err(|_| anyhow!("shard thread panicked"))?,
            ShardHandle::Process(mut c) => {
                let st = c.wait()?;
                if st.success() {
                    Ok(())
                } else {
                    Err(anyhow!("shard process ended with {st}"))
                }
            }
        }
    }

    /// After a router error: a child process that is stuck in NCCL is killed, not waited for.
    fn end(self) -> Result<()> {
        match self {
            ShardHandle::Thread(t) => t.join().map_err(|_| anyhow!("shard thread panicked"))?,
            ShardHandle::Process(mut c) => {
                for _ in 0..100 {
                    if let Some(st) = c.try_wait()? {
                        return Err(anyhow!("shard process ended with {st}"));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                c.kill()?;
                c.wait()?;
                Err(anyhow!("shard process killed after the router failed"))
            }
        }
    }
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|v| format!("{v:02x}")).collect()
}

fn hex_decode(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        bail!("odd-length hex id");
    }
    (0..s.len() / 2)
        .map(|i| Ok(u8::from_str_radix(&s[2 * i..2 * i + 2], 16)?))
        .collect()
}

fn run_shard(
    a: &Args,
    max_rows: usize,
    cfg: PlaneConfig,
    id: UniqueId,
    sink: CaptureSink,
    stop: &Arc<AtomicBool>,
) -> Result<()> {
    let a2 = a;
    {
        let t0 = Instant::now();
        let mut sh = BenchShard::new(a2, max_rows, sink)?;
        eprintln!(
            "shard: GPU {} ({}) ready with random weights in {:.1}s",
            a2.shard_gpu,
            sh.gpu.name,
            t0.elapsed().as_secs_f64()
        );
        let t1 = Instant::now();
        let mut plane = ShardPlane::new(sh.gpu.stream.clone(), id, 1, 2, cfg)?;
        eprintln!(
            "shard: NCCL rank 1 joined in {:.0} ms",
            t1.elapsed().as_secs_f64() * 1e3
        );
        let end = plane.run(&mut sh, stop)?;
        eprintln!("shard: loop ended: {end:?}");
        Ok(())
    }
}

fn run_router(
    a: &Args,
    cfg: PlaneConfig,
    id: UniqueId,
    capture: &CaptureSource,
    stop: &Arc<AtomicBool>,
    shard: ShardHandle,
) -> Result<()> {
    let (h, k) = (a.hidden, a.top_k);
    let max_rows = cfg.max_rows;
    let ctx = CudaContext::new(a.router_gpu)?;
    let stream = ctx.new_stream()?;
    let t1 = Instant::now();
    let mut plane = RouterPlane::new(stream.clone(), id, 1, cfg).context("router NCCL init")?;
    eprintln!(
        "router: NCCL rank 0 joined in {:.0} ms (waits for the shard's weight fill)",
        t1.elapsed().as_secs_f64() * 1e3
    );

    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let x_host: Vec<bf16> = (0..max_rows * h)
        .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
        .collect();
    let mut ids_host: Vec<u32> = Vec::with_capacity(max_rows * k);
    for _ in 0..max_rows {
        let mut row: Vec<u32> = Vec::with_capacity(k);
        while row.len() < k {
            let e = rng.random_range(0..a.experts as u32);
            if !row.contains(&e) {
                row.push(e);
            }
        }
        ids_host.extend(row);
    }
    let w_host: Vec<f32> = (0..max_rows * k)
        .map(|_| rng.random_range(0.01..0.5))
        .collect();
    let x = stream.clone_htod(&x_host)?;
    let ids = stream.clone_htod(&ids_host)?;
    let w = stream.clone_htod(&w_host)?;
    let mut partial = stream.alloc_zeros::<bf16>(max_rows * h)?;
    stream.synchronize()?;

    println!(
        "{:>6} {:>5} | {:>9} {:>9} {:>9} {:>9} | {:>8} | verify",
        "rows", "mode", "median µs", "p10 µs", "p90 µs", "min µs", "GB/s"
    );
    let mut cases: Vec<(usize, u32)> = Vec::new();
    if a.slot_rows > 0 {
        // slots carry decode sizes only, and the slot order knows the echo layer alone
        cases.extend(
            a.rows
                .iter()
                .filter(|&&r| r >= 1 && r <= a.slot_rows)
                .map(|&r| (r, LAYER_ECHO)),
        );
        if cases.is_empty() {
            bail!(
                "--slot-rows {} leaves none of --rows {:?}",
                a.slot_rows,
                a.rows
            );
        }
    } else {
        for &r in &a.rows {
            cases.push((r, LAYER_ECHO));
            cases.push((r, LAYER_FFN));
        }
        if a.bw_rows > 0 {
            cases.push((a.bw_rows, LAYER_ECHO));
        }
    }
    let run = run_cases(
        a,
        &mut plane,
        &stream,
        cases,
        capture,
        (&x, &ids, &w),
        &mut partial,
        (&x_host, &ids_host, &w_host),
    );
    let failures = match run {
        Ok(f) => f,
        Err(e) => {
            // The router only sees a timeout; the shard's own error says why.
            stop.store(true, Ordering::SeqCst);
            let shard_end = shard.end();
            eprintln!("shard ended with: {shard_end:?}");
            return Err(e);
        }
    };
    println!(
        "µs = wall time of RouterPlane::exchange (header + rows + ids + weights out, partials back, \
         waited to completion), over {} iterations after {} warm-ups (20 for >= 4096 rows); \
         GB/s = bytes both ways / median",
        a.iters, a.warmup
    );
    plane.shutdown().context("shutdown")?;
    stop.store(true, Ordering::SeqCst);
    shard.join()?;
    if !failures.is_empty() {
        bail!("verification failed: {failures:?}");
    }
    Ok(())
}

type Bufs<'a> = (&'a CudaSlice<bf16>, &'a CudaSlice<u32>, &'a CudaSlice<f32>);
type Hosts<'a> = (&'a [bf16], &'a [u32], &'a [f32]);

/// Verifies and times every (rows, layer) case; returns the verification failures.
#[allow(clippy::too_many_arguments)]
fn run_cases(
    a: &Args,
    plane: &mut RouterPlane,
    stream: &Arc<CudaStream>,
    cases: Vec<(usize, u32)>,
    capture: &CaptureSource,
    (x, ids, w): Bufs<'_>,
    partial: &mut CudaSlice<bf16>,
    (x_host, ids_host, w_host): Hosts<'_>,
) -> Result<Vec<String>> {
    let (h, k) = (a.hidden, a.top_k);
    let mut failures = Vec::new();
    for (rows, layer) in cases {
        let one = |plane: &mut RouterPlane,
                   partial: &mut cudarc::driver::CudaSlice<bf16>|
         -> Result<f64> {
            let mut parts = [ShardPart {
                rows,
                x: x.slice(0..rows * h),
                ids: ids.slice(0..rows * k),
                weights: w.slice(0..rows * k),
                partial: partial.slice_mut(0..rows * h),
            }];
            let t = Instant::now();
            if a.slot_rows > 0 {
                let (xp, ip, wp, pp) = (
                    parts[0].x.device_ptr(stream).0,
                    parts[0].ids.device_ptr(stream).0,
                    parts[0].weights.device_ptr(stream).0,
                    parts[0].partial.device_ptr_mut(stream).0,
                );
                // SAFETY: views of live buffers of rows x hidden / rows x k (partial: max_rows
                // >= slot rows x hidden); `sync` waits for the exchange before they are reused.
                unsafe { plane.exchange_slot(layer, rows, k, xp, ip, wp, &[pp]) }?;
                plane.sync()?;
            } else {
                plane.exchange(layer, k, &mut parts)?;
            }
            Ok(t.elapsed().as_secs_f64() * 1e6)
        };
        // verification exchange
        capture.arm();
        one(plane, partial)?;
        let c = capture.take(layer, rows)?;
        let got = stream.clone_dtoh(&partial.slice(0..rows * h))?;
        let mut bad = Vec::new();
        if c.layer != layer || c.rows != rows {
            bad.push(format!("shard saw layer {} rows {}", c.layer, c.rows));
        }
        if bits16(&c.x) != bits16(&x_host[..rows * h]) {
            bad.push("rows received != rows sent".into());
        }
        if c.ids
            .iter()
            .map(|&v| v as u32)
            .ne(ids_host[..rows * k].iter().copied())
        {
            bad.push("expert ids received != sent".into());
        }
        if c.weights
            .iter()
            .map(|v| v.to_bits())
            .ne(w_host[..rows * k].iter().map(|v| v.to_bits()))
        {
            bad.push("gate weights received != sent".into());
        }
        if bits16(&got) != bits16(&c.partial) {
            bad.push("partials received != partials computed on the shard".into());
        }
        if layer == LAYER_ECHO && bits16(&got) != bits16(&x_host[..rows * h]) {
            bad.push("echo partials != rows".into());
        }
        if layer == LAYER_FFN && got.iter().all(|v| v.to_f32() == 0.0) {
            bad.push("ffn partials are all zero".into());
        }
        let iters = if rows >= 4096 { 20 } else { a.iters };
        for _ in 0..a.warmup.min(iters) {
            one(plane, partial)?;
        }
        let mut t = Vec::with_capacity(iters);
        let before = plane.trace().cloned();
        for _ in 0..iters {
            t.push(one(plane, partial)?);
        }
        if let (Some(b), Some(now)) = (before, plane.trace()) {
            println!("  trace {rows} rows: {}", now.since(&b).summary());
        }
        let s = stat(t);
        let bytes = 2 * rows * h * 2 + rows * k * 8;
        let verdict = if bad.is_empty() {
            "bitwise ok".to_string()
        } else {
            bad.join("; ")
        };
        if !bad.is_empty() {
            failures.push(format!("{rows} rows layer {layer}: {verdict}"));
        }
        println!(
            "{:>6} {:>5} | {:>9.1} {:>9.1} {:>9.1} {:>9.1} | {:>8.1} | {verdict}",
            rows,
            if layer == LAYER_ECHO { "echo" } else { "ffn" },
            s.med,
            s.p10,
            s.p90,
            s.min,
            bytes as f64 / (s.med * 1e3)
        );
    }
    Ok(failures)
}
