//! `moe-roundtrip`: times one MoE layer's round trip router → 2 expert shards → router on
//! loopback, at hidden size 5120 (DeepSeek-V2's), for 1, 64 and 256 rows. The shards are real
//! `dsv2-expert` processes serving a random checkpoint written to a temp dir; the router side is
//! `dsv2_router::remote_experts::RemoteExperts`, the code the router runs per MoE layer.
//!
//! Three measurements per row count and wire dtype:
//! - `full`: `RemoteExperts::dispatch` + wait with real expert math on the shards;
//! - `raw`: the same requests sent on raw Forward streams, with each shard's reported
//!   `compute_time_ns` subtracted (transport + codec only);
//! - `zero`: every expert slot set to "no expert", so shards do no math (transport + codec).
//!
//! Plus a ceiling taken in the same run: plain TCP loopback bandwidth (one socket, 64 MiB writes).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Multi-MB message buffers come and go every MoE layer: glibc hands them back to the kernel
/// and faults them in again (half the loopback round trip at 256 rows, bench/RESULTS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result, bail};
use clap::Parser;
use dsv2_core::ModelConfig;
use dsv2_core::backend::Backend;
use dsv2_core::cpu::CpuBackend;
use dsv2_core::model::ExpertExecutor;
use dsv2_core::placement::{Placement, PlacementKind};
use dsv2_core::routing::{NO_EXPERT, Routing};
use dsv2_proto::expert::v1::expert_shard_client::ExpertShardClient;
use dsv2_proto::expert::v1::{Dtype, ForwardRequest, ForwardResponse};
use dsv2_proto::tensor::{encode_f32, encode_f32_as_bf16};
use dsv2_router::remote_experts::{RemoteExperts, WireDtype};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[derive(Parser, Debug)]
#[command(
    name = "moe-roundtrip",
    about = "Time one MoE-layer round trip router -> 2 expert shards -> router on loopback"
)]
struct Args {
    /// Row counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
    rows: Vec<usize>,
    /// Hidden size of the generated model.
    #[arg(long, default_value_t = 5120)]
    hidden: usize,
    /// Routed experts in the generated model (split over the 2 shards).
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Experts per row (DeepSeek-V2: 6).
    #[arg(long, default_value_t = 6)]
    top_k: usize,
    /// Expert intermediate size (DeepSeek-V2: 1536).
    #[arg(long, default_value_t = 1536)]
    moe_intermediate: usize,
    /// Timed iterations per measurement (after one warm-up).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Device of the expert shards (cpu, cuda:N): on a GPU host this is the gRPC transport's
    /// side of the NCCL-vs-gRPC comparison (scripts/gpu-nccl.sh).
    #[arg(long, default_value = "cpu")]
    expert_device: String,
}

fn config_json(a: &Args) -> serde_json::Value {
    // One dense layer + one MoE layer; attention dims small (the shards never load them).
    serde_json::json!({
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "vocab_size": 256, "hidden_size": a.hidden, "intermediate_size": 256,
        "moe_intermediate_size": a.moe_intermediate, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "q_lora_rank": 64,
        "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
        "n_routed_experts": a.experts, "n_shared_experts": 1, "num_experts_per_tok": a.top_k,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "routed_scaling_factor": 1.0, "norm_topk_prob": false, "scoring_func": "softmax",
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "rope_theta": 10000, "rope_scaling": null,
        "max_position_embeddings": 4096, "bos_token_id": 0, "eos_token_id": 1,
        "tie_word_embeddings": false, "attention_bias": false, "torch_dtype": "bfloat16"
    })
}

fn write_model(a: &Args, dir: &Path) -> Result<ModelConfig> {
    let cfg_text = serde_json::to_string_pretty(&config_json(a))?;
    std::fs::write(dir.join("config.json"), &cfg_text)?;
    let cfg = ModelConfig::from_json_str(&cfg_text)?;
    dsv2_core::tiny::write_random_weights(&cfg, 7, &dir.join("model.safetensors"))?;
    Ok(cfg)
}

/// Deterministic inputs: rows of small values and, per row, `top_k` distinct experts spread
/// over both shards, weights 1/k.
fn inputs(rows: usize, h: usize, n_exp: usize, k: usize) -> (Vec<f32>, Routing) {
    let x: Vec<f32> = (0..rows * h)
        .map(|i| ((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    // Experts r, r+1, .., r+k-1 (mod E): with k = 6 of 8 experts every row needs both shards.
    let ids: Vec<u32> = (0..rows)
        .flat_map(|r| (0..k).map(move |j| ((r + j) % n_exp) as u32))
        .collect();
    let weights = vec![1.0 / k as f32; rows * k];
    (
        x,
        Routing {
            top_k: k,
            ids,
            weights,
        },
    )
}

struct Stat {
    median_us: f64,
    min_us: f64,
}

fn stat(mut v: Vec<f64>) -> Stat {
    v.sort_by(|a, b| a.total_cmp(b));
    Stat {
        median_us: v[v.len() / 2],
        min_us: v[0],
    }
}

/// One raw Forward stream per shard, driven request/response.
struct RawShard {
    tx: mpsc::Sender<ForwardRequest>,
    rx: tonic::Streaming<ForwardResponse>,
}

async fn raw_shard(url: &str) -> Result<RawShard> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut client = ExpertShardClient::new(ch)
        .max_decoding_message_size(1 << 30)
        .max_encoding_message_size(1 << 30);
    let (tx, rx) = mpsc::channel(4);
    let inbound = client
        .forward(ReceiverStream::new(rx))
        .await
        .context("opening Forward")?
        .into_inner();
    Ok(RawShard { tx, rx: inbound })
}

/// One shard's share of a layer: row count, their hidden values, expert ids and gate weights
/// per slot (slots of other shards hold "no expert").
type Part = (usize, Vec<f32>, Vec<u32>, Vec<f32>);

/// Per shard: its part, built the way RemoteExperts builds it.
fn split(x: &[f32], routing: &Routing, owner: &[usize], h: usize, zero_cost: bool) -> Vec<Part> {
    let mut out = vec![(0usize, Vec::new(), Vec::new(), Vec::new()); 2];
    for r in 0..routing.rows() {
        let (ids, ws) = routing.row(r);
        for (s, entry) in out.iter_mut().enumerate() {
            if !ids.iter().any(|&e| owner[e as usize] == s) {
                continue;
            }
            entry.0 += 1;
            entry.1.extend_from_slice(&x[r * h..(r + 1) * h]);
            for (&e, &w) in ids.iter().zip(ws) {
                let mine = owner[e as usize] == s && !zero_cost;
                entry.2.push(if mine { e } else { NO_EXPERT });
                entry.3.push(if mine { w } else { 0.0 });
            }
        }
    }
    out
}

/// One raw round trip to both shards; returns (wall ns, max shard compute ns, bytes moved).
async fn raw_round_trip(
    shards: &mut [RawShard],
    parts: &[Part],
    h: usize,
    k: usize,
    wire: Dtype,
    id: &mut u64,
) -> Result<(u128, u64, usize)> {
    let t0 = Instant::now();
    let mut bytes = 0;
    let mut sent = Vec::new();
    for (s, (rows, xs, ids, ws)) in parts.iter().enumerate() {
        if *rows == 0 {
            continue;
        }
        let hidden = match wire {
            Dtype::F32 => encode_f32(xs),
            _ => encode_f32_as_bf16(xs),
        };
        bytes += hidden.len();
        *id += 1;
        shards[s]
            .tx
            .send(ForwardRequest {
                request_id: *id,
                layer: 1,
                num_rows: *rows as u32,
                hidden_size: h as u32,
                hidden,
                hidden_dtype: wire as i32,
                experts_per_row: k as u32,
                expert_ids: ids.clone(),
                gate_weights: ws.clone(),
                partial_dtype: wire as i32,
                traceparents: vec![],
            })
            .await
            .context("shard stream closed")?;
        sent.push(s);
    }
    let mut compute = 0;
    for s in sent {
        let resp = shards[s]
            .rx
            .message()
            .await?
            .context("shard closed its stream")?;
        if let Some(e) = resp.error {
            bail!("shard {s}: {}", e.message);
        }
        bytes += resp.partial.len();
        compute = compute.max(resp.compute_time_ns);
    }
    Ok((t0.elapsed().as_nanos(), compute, bytes))
}

/// Plain TCP loopback bandwidth: one socket, `total` bytes in 4 MiB writes.
fn tcp_loopback_gbps(total: usize) -> Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 4 << 20];
        let mut n = 0;
        loop {
            let r = s.read(&mut buf)?;
            if r == 0 {
                return Ok(n);
            }
            n += r;
        }
    });
    let mut s = TcpStream::connect(addr)?;
    let buf = vec![1u8; 4 << 20];
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < total {
        s.write_all(&buf)?;
        sent += buf.len();
    }
    drop(s);
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
    let secs = t0.elapsed().as_secs_f64();
    Ok(got as f64 / secs / 1e9)
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.top_k == 0 || a.top_k > a.experts {
        bail!("--top-k must be in 1..={}", a.experts);
    }
    let dir = tempfile::tempdir()?;
    let t0 = Instant::now();
    let cfg = write_model(&a, dir.path())?;
    eprintln!(
        "wrote a random checkpoint (hidden {}, {} experts x {}) in {:.1}s to {}",
        a.hidden,
        a.experts,
        a.moe_intermediate,
        t0.elapsed().as_secs_f64(),
        dir.path().display()
    );
    let placement = Placement::build(&cfg, 2, PlacementKind::Contiguous)?;
    let procs: Vec<_> = placement
        .shards
        .iter()
        .enumerate()
        .map(|(i, ids)| {
            let mut cmd = std::process::Command::new(dsv2_e2e::bin("dsv2-expert"));
            cmd.arg("--model-dir").arg(dir.path()).args([
                "--experts",
                &dsv2_e2e::expert_list(ids),
                "--device",
                &a.expert_device,
                "--listen",
                "127.0.0.1:0",
            ]);
            dsv2_e2e::Proc::start(&format!("expert-{i}"), cmd)
        })
        .collect();
    let urls: Vec<String> = procs.iter().map(|p| p.url()).collect();
    let owner = placement.owner_table(cfg.n_routed_experts);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let backend = Arc::new(CpuBackend);
    let h = a.hidden;
    let ceiling = tcp_loopback_gbps(1 << 30)?;
    println!("TCP loopback ceiling (1 socket, 1 GiB in 4 MiB writes): {ceiling:.2} GB/s");
    println!(
        "{:>5} {:>5} | {:>10} {:>7} | {:>10} {:>10} {:>10} {:>7} | {:>10} {:>7} | {:>9}",
        "rows",
        "wire",
        "full µs",
        "GB/s",
        "raw µs",
        "compute µs",
        "raw-comp µs",
        "GB/s",
        "zero µs",
        "GB/s",
        "MB moved"
    );
    for &rows in &a.rows {
        let (x, routing) = inputs(rows, h, cfg.n_routed_experts, a.top_k);
        let xa = backend.act_from_host(rows, h, &x)?;
        for (wire, dtype) in [(WireDtype::F32, Dtype::F32), (WireDtype::Bf16, Dtype::Bf16)] {
            let remote = RemoteExperts::new(
                backend.clone(),
                rt.handle().clone(),
                &cfg,
                &placement,
                urls.clone(),
                wire,
                Duration::from_secs(120),
            );
            // full: the router's own code path.
            let mut full = Vec::new();
            for i in 0..=a.iters {
                let t = Instant::now();
                let y = remote.dispatch(1, &xa, &routing)?.wait()?;
                let ns = t.elapsed().as_nanos() as f64;
                if i > 0 {
                    full.push(ns / 1e3);
                }
                std::hint::black_box(y);
            }
            // raw and zero-cost: the same bytes on raw Forward streams.
            let (raw, zero, bytes) = rt.block_on(async {
                let mut shards = Vec::new();
                for u in &urls {
                    shards.push(raw_shard(u).await?);
                }
                let mut id = 0;
                let real = split(&x, &routing, &owner, h, false);
                let none = split(&x, &routing, &owner, h, true);
                let (mut raw, mut zero, mut bytes) = (Vec::new(), Vec::new(), 0);
                for i in 0..=a.iters {
                    let (ns, comp, b) =
                        raw_round_trip(&mut shards, &real, h, a.top_k, dtype, &mut id).await?;
                    let (zns, _, _) =
                        raw_round_trip(&mut shards, &none, h, a.top_k, dtype, &mut id).await?;
                    if i > 0 {
                        raw.push((ns as f64, comp as f64));
                        zero.push(zns as f64 / 1e3);
                    }
                    bytes = b;
                }
                Ok::<_, anyhow::Error>((raw, zero, bytes))
            })?;
            let full = stat(full);
            let raw_wall = stat(raw.iter().map(|r| r.0 / 1e3).collect());
            let raw_comp = stat(raw.iter().map(|r| r.1 / 1e3).collect());
            let raw_net = stat(raw.iter().map(|r| (r.0 - r.1) / 1e3).collect());
            let zero = stat(zero);
            let gbps = |us: f64| bytes as f64 / (us * 1e3);
            println!(
                "{:>5} {:>5} | {:>10.0} {:>7.3} | {:>10.0} {:>10.0} {:>10.0} {:>7.3} | {:>10.0} {:>7.3} | {:>9.2}",
                rows,
                if wire == WireDtype::F32 {
                    "f32"
                } else {
                    "bf16"
                },
                full.median_us,
                gbps(full.median_us),
                raw_wall.median_us,
                raw_comp.median_us,
                raw_net.median_us,
                gbps(raw_net.median_us),
                zero.median_us,
                gbps(zero.median_us),
                bytes as f64 / 1e6,
            );
            eprintln!(
                "  (min: full {:.0} µs, raw-compute {:.0} µs, zero {:.0} µs)",
                full.min_us, raw_net.min_us, zero.min_us
            );
        }
    }
    println!(
        "median of {} iterations after 1 warm-up; GB/s = (hidden rows sent + partials received) / time",
        a.iters
    );
    drop(procs);
    Ok(())
}
