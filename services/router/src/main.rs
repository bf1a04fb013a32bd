//! `dsv2-router`: loads everything but the routed experts, checks the expert shards, and serves
//! `dsv2.v1.Inference` with health and reflection (and, with --http-listen, the OpenAI-compatible
//! HTTP API) until SIGTERM/Ctrl-C, then drains.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Multi-MB message and activation buffers come and go every MoE layer: glibc hands them back
/// to the kernel and faults them in again (half the loopback round trip at 256 rows,
/// bench/RESULTS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result, bail};
use clap::Parser;
use dsv2_core::ModelConfig;
use dsv2_core::backend::{AttnMode, Backend, DeviceSpec, KvCacheDtype};
use dsv2_core::chat::ChatTemplate;
use dsv2_core::cpu::CpuBackend;
use dsv2_core::engine::{Engine, EngineConfig};
use dsv2_core::model::{ExpertExecutor, ExpertSelection, LocalExperts, Model};
use dsv2_core::placement::{Placement, PlacementKind};
use dsv2_core::tokenizer::Tokenizer;
use dsv2_core::weights::WeightStore;
use dsv2_cuda_backend::CudaBackend;
use dsv2_nccl_experts::{NcclExperts, PlaneShard};
use dsv2_proto::inference::v1::inference_server::InferenceServer;
use dsv2_router::engine_task::EngineHandle;
use dsv2_router::http::HttpApi;
use dsv2_router::limits::{ArrivalLayer, InFlightLimitLayer, RequestTimeoutLayer};
use dsv2_router::remote_experts::{RemoteExperts, WireDtype, check_shards, shard_info};
use dsv2_router::service::{InferenceApi, InferenceService, ModelFacts};
use dsv2_security::auth::{RequireBearerLayer, Tokens};
use dsv2_security::client::Dialer;
use dsv2_security::server::{ALPN_GRPC, ALPN_HTTP1, Incoming};
use dsv2_server::{LogFormat, Transport};
use tonic::service::LayerExt;
use tonic_health::ServingStatus;

#[derive(Parser, Debug)]
#[command(
    name = "dsv2-router",
    version,
    about = "DeepSeek-V2 router: public gRPC API, batching, attention and gating; routed experts on expert shards"
)]
struct Config {
    /// Model directory (Hugging Face layout), or `tiny` for the embedded tiny random model.
    #[arg(long, default_value = "tiny")]
    model_dir: String,
    /// Serve the random weights of the model dir's config.json drawn from this seed (what
    /// `dsv2 init-random --seed SEED` writes; on a GPU generated in place) instead of reading
    /// weight files: full-scale benchmarks without a checkpoint. Router and shards must agree.
    #[arg(long, value_name = "SEED")]
    random_weights: Option<u64>,
    /// Address to serve dsv2.v1.Inference on (port 0 picks a free port; the bound address is
    /// printed as `DSV2_READY <addr>` on stdout).
    #[arg(long, default_value = "0.0.0.0:50051")]
    listen: SocketAddr,
    /// Also serve the OpenAI-compatible HTTP API here, e.g. 0.0.0.0:8000: POST /v1/completions
    /// and /v1/chat/completions (stream: true for server-sent events), GET /v1/models and
    /// /health. Same engine, validation, --max-concurrent and --request-timeout-s as gRPC. Port 0
    /// picks a free port, printed as `DSV2_HTTP_READY <addr>` on stdout. Unset: no HTTP API.
    #[arg(long, env = "DSV2_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// TLS of the gRPC and HTTP APIs (README, "TLS and auth").
    #[command(flatten)]
    tls: dsv2_security::args::ServerTlsArgs,
    /// Bearer tokens (one a line, re-read when the file changes) that every dsv2.v1.Inference
    /// call and /v1/* request must send as `authorization: Bearer <token>`; health and
    /// reflection stay open. Unset: no authentication.
    #[arg(long, env = "DSV2_AUTH_TOKEN_FILE", value_name = "FILE")]
    auth_token_file: Option<PathBuf>,
    /// How to reach https:// shards, and the token they want.
    #[command(flatten)]
    shard_client: dsv2_security::args::ShardClientArgs,
    /// Jinja chat template for conversation prompts (gRPC `messages`, /v1/chat/completions),
    /// instead of the `chat_template` of the model dir's tokenizer_config.json.
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
    /// Expert shard URL, e.g. http://127.0.0.1:50061 (repeat, in shard order). None: all routed
    /// experts run inside the router.
    #[arg(long = "shard")]
    shards: Vec<String>,
    /// Expert placement: groups, contiguous, or a JSON file {"shards": [[ids], ...]}. Default:
    /// groups when the routing groups divide evenly over the shards, else contiguous.
    #[arg(long)]
    placement: Option<String>,
    /// Put each expert on this many shards (the placement chained: shard s also hosts shard
    /// s+1's experts, ...; start each shard with the same --replicas). The router spreads rows
    /// over the replicas and, when a shard fails, re-sends its rows to another within the step.
    #[arg(long, default_value_t = 1, env = "DSV2_REPLICAS")]
    replicas: usize,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// KV cache blocks (each holds --block-size tokens of every layer's latent).
    #[arg(long, default_value_t = 2048)]
    kv_cache_blocks: usize,
    /// Size the KV cache by memory instead: as many blocks as fit in this many GiB (fractions
    /// allowed) at --kv-cache-dtype's bytes per token, so fp8 holds about 1.76 × the tokens of
    /// bf16 in the same memory. The start log names the blocks, tokens and bytes.
    #[arg(long, env = "DSV2_KV_CACHE_GB", value_name = "GIB", value_parser = dsv2_router::host_memory::parse_gib, conflicts_with = "kv_cache_blocks")]
    kv_cache_gb: Option<u64>,
    /// How the KV cache holds the latent: bf16, or fp8 (e4m3 with one f32 scale per token, the
    /// RoPE key kept in bf16: 656 bytes a token and layer instead of 1,152 at DeepSeek-V2's dims,
    /// so 1.76 × the tokens fit; logits moved by 4e-3 to 4e-2 relative on an H100). GPU only. Its decode kernel
    /// is still slower than bf16's (0.64-0.68 × on an H100): choose it for capacity, not speed.
    #[arg(long, env = "DSV2_KV_CACHE_DTYPE", default_value = "bf16")]
    kv_cache_dtype: KvCacheDtype,
    /// Tokens per KV cache block. 64 (or a multiple) lets 128-head models (DeepSeek-V2) decode
    /// with the paired TMA MLA kernel, 1.7 % faster a step at batch 64 x 4096 on an H100;
    /// prefix caching then shares whole 64-token blocks only.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Token budget of one scheduler step [default: 512 on the CPU, 8192 on a GPU, where long
    /// prompts prefill in few large steps: the prefill kernels need thousands of rows per step to
    /// run near their peak].
    #[arg(long)]
    max_batch_tokens: Option<usize>,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// Turn off the prefix cache (on by default: requests take the cached KV blocks of a prompt
    /// prefix an earlier request computed, and prefill only the rest).
    #[arg(long)]
    no_prefix_cache: bool,
    /// Host memory for the prefix cache's host tier, GiB (fractions allowed; 0: none). Cached KV
    /// blocks the device evicts are copied there (page-locked on a GPU) and copied back, instead
    /// of prefilled again, when a later prompt starts with them; the least recently used go when
    /// it is full. Allocated as it fills. Needs the prefix cache. [default: 0 on the CPU; on a
    /// GPU min(16, a quarter of the host's memory or cgroup limit)]
    #[arg(long, env = "DSV2_HOST_CACHE_GB", value_name = "GIB", value_parser = dsv2_router::host_memory::parse_gib)]
    host_cache_gb: Option<u64>,
    /// Most requests held (queued + running); more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Most dsv2.v1.Inference calls in flight at once, across all connections (a stream counts
    /// until it ends); the next is answered RESOURCE_EXHAUSTED at once, before any work. Keep it
    /// at or above --max-queue so the engine's queue can fill. Health and reflection are exempt.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    max_concurrent: u32,
    /// Longest a dsv2.v1.Inference call may take, seconds, fractions allowed (0: no limit); a
    /// client's gRPC deadline can shorten it, not extend it. Past it the call ends
    /// DEADLINE_EXCEEDED and its cache is freed.
    #[arg(long, default_value_t = 600.0, value_parser = parse_timeout_secs)]
    request_timeout_s: f64,
    /// After SIGTERM, how long in-flight requests may take to finish, seconds.
    #[arg(long, default_value_t = 30)]
    drain_timeout_s: u64,
    /// How long to wait at start for every shard to answer Info, seconds.
    #[arg(long, default_value_t = 120)]
    shard_wait_s: u64,
    /// How long one MoE layer may wait for a shard before the step fails UNAVAILABLE, seconds.
    #[arg(long, default_value_t = 30)]
    shard_timeout_s: u64,
    /// Default max_new_tokens when a request sets none.
    #[arg(long, default_value_t = 256)]
    default_max_new_tokens: u32,
    /// Serve Prometheus metrics (GET /metrics) on this address, e.g. 0.0.0.0:9090 (port 0 picks
    /// a free port, printed as `DSV2_METRICS_READY <addr>` on stdout before DSV2_READY).
    #[arg(long, env = "DSV2_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Export trace spans over OTLP/gRPC to this collector, e.g. http://otel-collector:4317
    /// (service name dsv2-router; OTEL_* variables tune the batching and sampling). A client's
    /// W3C `traceparent` (gRPC metadata or HTTP header) parents the request's spans, and the
    /// shards get the trace context with each layer. Unset: spans only reach the logs.
    #[arg(long, env = "DSV2_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Data plane to the shards: grpc (any device, any host), or nccl (GPU to GPU on one host:
    /// needs --device cuda:N and shards started with --device cuda:M --transport nccl; gRPC
    /// stays the control plane and hands them the NCCL id). Experimental NCCL settings, which
    /// the router hands the shards too: DSV2_NCCL_SLOTS=N (decode batches of up to N <= 4 rows
    /// in one pre-posted message per layer) and DSV2_NCCL_BLOCKING=1 (README, "GPUs").
    #[arg(long, value_enum, default_value = "grpc")]
    transport: Transport,
    #[arg(long, value_enum, env = "DSV2_LOG_FORMAT", default_value = "human")]
    log_format: LogFormat,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, env = "DSV2_LOG", default_value = "info")]
    log_level: String,
}

/// A timeout in seconds: finite, not negative, and within what a `Duration` holds.
fn parse_timeout_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    Duration::try_from_secs_f64(v).map_err(|e| format!("{v}: {e}"))?;
    Ok(v)
}

impl Config {
    /// `--host-cache-gb` in bytes, or the device's default (none without the prefix cache).
    fn host_cache_bytes(&self) -> Result<u64> {
        match (self.host_cache_gb, self.no_prefix_cache) {
            (Some(b), true) if b > 0 => {
                bail!("--host-cache-gb needs the prefix cache: drop --no-prefix-cache or set 0")
            }
            (_, true) => Ok(0),
            (Some(b), false) => Ok(b),
            (None, false) => Ok(dsv2_router::host_memory::default_host_cache_bytes(
                self.device,
            )),
        }
    }

    /// KV cache blocks: `--kv-cache-blocks`, or as many blocks of `block_bytes` (every layer, in
    /// the cache's dtype) as `--kv-cache-gb` holds.
    fn cache_blocks(&self, block_bytes: u64) -> Result<usize> {
        match self.kv_cache_gb {
            None => Ok(self.kv_cache_blocks),
            Some(bytes) => match (bytes / block_bytes.max(1)) as usize {
                0 => bail!(
                    "--kv-cache-gb holds no cache block: one block of {} tokens takes {block_bytes} bytes",
                    self.block_size
                ),
                n => Ok(n),
            },
        }
    }

    /// `--max-batch-tokens`, or the device's default.
    fn max_batch_tokens(&self) -> usize {
        self.max_batch_tokens.unwrap_or(match self.device {
            DeviceSpec::Cpu => 512,
            DeviceSpec::Cuda(_) => 8192,
        })
    }
}

fn main() -> Result<()> {
    let cfg = Config::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    let telemetry = dsv2_server::telemetry::init(
        "dsv2-router",
        &cfg.log_level,
        cfg.log_format,
        "info",
        cfg.otlp_endpoint.as_deref(),
        &handle,
    )
    .map_err(anyhow::Error::msg)?;
    let served = rt.block_on(serve(cfg, handle));
    // Off the runtime's workers, while it still runs the export of the last spans.
    telemetry.shutdown();
    served
}

/// Builds the NCCL expert executor once the model and the placement are known (CUDA only).
/// Its third argument: the experts each shard reports loaded, in `--shard` order.
type NcclMaker<B> = Box<
    dyn FnOnce(&ModelConfig, &Placement, Vec<Vec<usize>>) -> Result<Arc<dyn ExpertExecutor<B>>>
        + Send,
>;

async fn serve(c: Config, rt: tokio::runtime::Handle) -> Result<()> {
    // Contradicting flags stop the start before anything loads.
    c.host_cache_bytes()?;
    match c.device {
        DeviceSpec::Cpu => {
            if c.transport == Transport::Nccl {
                bail!(
                    "--transport nccl moves GPU buffers: it needs --device cuda:N here and GPU shards; use --transport grpc on the CPU"
                );
            }
            c.kv_cache_dtype.check_cpu().map_err(anyhow::Error::msg)?;
            serve_on(c, rt, Arc::new(CpuBackend), None).await
        }
        DeviceSpec::Cuda(n) => {
            let backend = dsv2_cuda_backend::open(n)
                .map_err(|e| anyhow::anyhow!("--device cuda:{n}: {e}"))?;
            backend.set_kv_cache_dtype(c.kv_cache_dtype);
            let nccl: Option<NcclMaker<CudaBackend>> = if c.transport == Transport::Nccl {
                if c.shards.is_empty() {
                    bail!(
                        "--transport nccl needs --shard URLs of GPU expert shards started with --transport nccl"
                    );
                }
                let (b, r, eps) = (backend.clone(), rt.clone(), c.shards.clone());
                let (rows, timeout) =
                    (c.max_batch_tokens(), Duration::from_secs(c.shard_timeout_s));
                Some(Box::new(
                    move |mcfg: &ModelConfig, placement: &Placement, hosted: Vec<Vec<usize>>| {
                        let shards = eps
                            .into_iter()
                            .zip(hosted)
                            .map(|(endpoint, experts)| PlaneShard { endpoint, experts })
                            .collect();
                        let ex =
                            NcclExperts::connect(b, r, mcfg, placement, shards, rows, timeout)?;
                        Ok(Arc::new(ex) as Arc<dyn ExpertExecutor<CudaBackend>>)
                    },
                ))
            } else {
                None
            };
            serve_on(c, rt, backend, nccl).await
        }
    }
}

async fn serve_on<B: Backend>(
    c: Config,
    rt: tokio::runtime::Handle,
    backend: Arc<B>,
    nccl: Option<NcclMaker<B>>,
) -> Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    // Every certificate, key and token file is read before the model: a bad one fails at once.
    let grpc_tls = dsv2_security::server::ServerTls::from_args(&c.tls, ALPN_GRPC)?;
    let http_tls = dsv2_security::server::ServerTls::from_args(&c.tls, ALPN_HTTP1)?;
    let tokens = c
        .auth_token_file
        .clone()
        .map(|f| Tokens::from_file("--auth-token-file", f))
        .transpose()?;
    dsv2_security::client::set_shard_dialer(Dialer::from_args(&c.shard_client)?)?;

    let dir = dsv2_server::resolve_model_dir(&c.model_dir)?;
    let t0 = Instant::now();
    let mcfg = ModelConfig::from_model_dir(&dir)?;
    let local = c.shards.is_empty();
    let store =
        WeightStore::open_or_random(&dir, c.random_weights, |n| local || Model::<B>::wants(n))
            .with_context(|| format!("opening {}", dir.display()))?;
    let model = Arc::new(Model::load(backend.clone(), mcfg.clone(), &store)?);
    let tokenizer = if dir.join("tokenizer.json").exists() {
        Some(Arc::new(Tokenizer::from_model_dir(
            &dir,
            mcfg.bos_token_id,
        )?))
    } else {
        None
    };
    tracing::info!(dir = %dir.display(), layers = mcfg.num_hidden_layers, experts = mcfg.n_routed_experts, secs = t0.elapsed().as_secs_f64(), "model loaded");
    let template_override = c
        .chat_template
        .as_ref()
        .map(|p| {
            std::fs::read_to_string(p)
                .with_context(|| format!("reading --chat-template {}", p.display()))
        })
        .transpose()?;
    if template_override.is_some() && tokenizer.is_none() {
        bail!(
            "--chat-template: the model dir has no tokenizer.json to tokenize the rendered prompt with"
        );
    }
    let chat_template = match &tokenizer {
        Some(_) => ChatTemplate::from_model_dir(&dir, template_override.as_deref())?.map(Arc::new),
        None => None,
    };
    if chat_template.is_none() {
        tracing::info!("no chat template: conversation prompts (messages) will be refused");
    }

    // Shard liveness and row counters for /metrics (the gRPC data plane's).
    let mut shard_stats = None;
    let experts: Arc<dyn ExpertExecutor<B>> = if local {
        tracing::info!("no --shard given: routed experts run inside the router");
        Arc::new(LocalExperts::load(
            backend.clone(),
            &mcfg,
            &store,
            &ExpertSelection::All,
        )?)
    } else {
        let placement = match c.placement.as_deref() {
            None => Placement::default_for(&mcfg, c.shards.len())?,
            Some("groups") => Placement::build(&mcfg, c.shards.len(), PlacementKind::Groups)?,
            Some("contiguous") => {
                Placement::build(&mcfg, c.shards.len(), PlacementKind::Contiguous)?
            }
            Some(file) => Placement::from_file(std::path::Path::new(file), &mcfg)?,
        }
        .replicated(c.replicas)?;
        if placement.shards.len() != c.shards.len() {
            bail!(
                "the placement lists {} shards but {} --shard URLs were given",
                placement.shards.len(),
                c.shards.len()
            );
        }
        let wait = Duration::from_secs(c.shard_wait_s);
        let mut infos = Vec::new();
        for ep in &c.shards {
            let started = Instant::now();
            let info = loop {
                match shard_info(ep, Duration::from_secs(5)).await {
                    Ok(i) => break i,
                    Err(e) if started.elapsed() < wait => {
                        tracing::info!(shard = %ep, error = %e, "waiting for expert shard");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(e) => bail!(
                        "expert shard {ep} did not answer within {}s: {e}",
                        c.shard_wait_s
                    ),
                }
            };
            infos.push(info);
        }
        check_shards(&mcfg, &placement, &c.shards, &infos)
            .map_err(|e| anyhow::anyhow!("refusing to serve: {e}"))?;
        tracing::info!(
            shards = c.shards.len(),
            "every expert is covered by a shard serving the same model"
        );
        match nccl {
            Some(make) => {
                if c.replicas > 1 {
                    tracing::warn!(
                        "--transport nccl does not fail over: each expert's first shard serves it, and a lost shard fails its steps UNAVAILABLE until the plane is re-established"
                    );
                }
                // The bootstrap blocks (NcclInit RPCs, then the collective init): off the
                // async workers.
                let m = mcfg.clone();
                let hosted = infos
                    .iter()
                    .map(|i| i.expert_ids.iter().map(|&e| e as usize).collect())
                    .collect();
                let t0 = Instant::now();
                let ex = tokio::task::spawn_blocking(move || make(&m, &placement, hosted))
                    .await
                    .context("NCCL bootstrap task")?
                    .context("--transport nccl: bringing up the NCCL data plane")?;
                tracing::info!(
                    secs = t0.elapsed().as_secs_f64(),
                    "routed experts travel over NCCL"
                );
                ex
            }
            None => {
                let ex = RemoteExperts::new(
                    backend.clone(),
                    rt.clone(),
                    &mcfg,
                    &placement,
                    c.shards.clone(),
                    WireDtype::F32,
                    Duration::from_secs(c.shard_timeout_s),
                );
                shard_stats = Some(ex.stats());
                Arc::new(ex)
            }
        }
    };

    // the cache's size: --kv-cache-blocks, or the blocks --kv-cache-gb holds at this dtype
    let block_bytes = backend.host_block_bytes(&mcfg, c.block_size).max(1) as u64;
    let num_blocks = c.cache_blocks(block_bytes)?;
    let cache_bytes = num_blocks as u64 * block_bytes;
    tracing::info!(
        dtype = %c.kv_cache_dtype,
        blocks = num_blocks,
        block_size = c.block_size,
        tokens = num_blocks * c.block_size,
        bytes_per_token = block_bytes / c.block_size.max(1) as u64,
        gib = cache_bytes as f64 / (1u64 << 30) as f64,
        "KV cache: {} blocks x {} = {} tokens in {:.2} GiB ({})",
        num_blocks,
        c.block_size,
        num_blocks * c.block_size,
        cache_bytes as f64 / (1u64 << 30) as f64,
        c.kv_cache_dtype
    );
    let engine = Engine::new(
        model.clone(),
        experts,
        tokenizer.clone(),
        EngineConfig {
            num_blocks,
            block_size: c.block_size,
            max_batch_tokens: c.max_batch_tokens(),
            max_running: c.max_running,
            attn_mode: AttnMode::Auto,
            prefix_cache: !c.no_prefix_cache,
            host_cache_bytes: c.host_cache_bytes()?,
        },
    )?;
    // One short request before serving: the first client does not pay the one-time costs, and
    // a data plane that cannot carry a layer stops the start here, not at the first request.
    // (Blocking: the remote executors block on their own runtime, not on this one.)
    let (engine, took) = tokio::task::spawn_blocking(move || {
        let mut engine = engine;
        let took = engine.warm_up();
        (engine, took)
    })
    .await
    .context("warm-up task")?;
    let took = took.context("warm-up request through the model and the expert shards failed")?;
    tracing::info!(ms = took.as_secs_f64() * 1e3, "warm-up request done");
    let mut engine = EngineHandle::spawn(engine, c.max_queue);
    engine.kv_cache_bytes = cache_bytes;
    let facts = ModelFacts {
        model_name: dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        config_fingerprint: mcfg.fingerprint(),
        weights_fingerprint: store.fingerprint(),
        vocab_size: mcfg.vocab_size as u32,
        max_context_tokens: mcfg.max_position_embeddings as u32,
        bos_token_id: mcfg.bos_token_id.unwrap_or_default(),
        eos_token_ids: mcfg.eos_token_ids.clone(),
        num_layers: mcfg.num_hidden_layers as u32,
        hidden_size: mcfg.hidden_size as u32,
        num_routed_experts: mcfg.n_routed_experts as u32,
        num_experts_per_token: mcfg.num_experts_per_tok as u32,
        shard_endpoints: c.shards.clone(),
        device: format!("{} ({})", c.device, backend.name()),
    };
    // parse_timeout_secs made sure the value fits a Duration.
    let request_timeout =
        (c.request_timeout_s > 0.0).then(|| Duration::from_secs_f64(c.request_timeout_s));
    let service = Arc::new(InferenceService {
        engine: engine.clone(),
        tokenizer,
        chat_template,
        facts,
        default_max_new_tokens: c.default_max_new_tokens,
        request_timeout,
    });
    // Only the public API gets the limit and the timeout (outermost first: the arrival stamp
    // that client deadlines count from, then the limit, so a shed request starts no timer);
    // health and reflection stay answerable when the router is saturated.
    // One in-flight limit for both APIs.
    let in_flight =
        InFlightLimitLayer::new(c.max_concurrent as usize).counting_into(engine.metrics.clone());
    let inference_layers = tower::ServiceBuilder::new()
        .layer(ArrivalLayer)
        .layer(in_flight.clone())
        .layer(RequestTimeoutLayer::new(request_timeout));
    // Both reflection versions: grpcurl speaks v1, older ghz builds v1alpha.
    let (reflection, reflection_alpha) = dsv2_server::reflection_services()?;
    let listener = tokio::net::TcpListener::bind(c.listen)
        .await
        .with_context(|| format!("binding {}", c.listen))?;
    let addr = listener.local_addr()?;
    let http_listener = match c.http_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding --http-listen {a}"))?,
        ),
        None => None,
    };
    health_reporter
        .set_serving::<InferenceServer<InferenceApi>>()
        .await;
    health_reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    tracing::info!(
        %addr,
        blocks = engine.num_blocks,
        max_concurrent = c.max_concurrent,
        request_timeout_s = c.request_timeout_s,
        "router serving dsv2.v1.Inference"
    );
    let api = InferenceApi(service);
    let http_stop = Arc::new(tokio::sync::Notify::new());
    let (http_api, mut http_server) = match http_listener {
        Some(l) => {
            let http_addr = l.local_addr()?;
            let state = HttpApi::new(api.clone(), in_flight.clone());
            let stop = http_stop.clone();
            let incoming = Incoming::new(l, http_tls)?;
            let server = tokio::spawn(dsv2_router::http::serve(
                incoming,
                state.clone(),
                tokens.clone(),
                async move {
                    stop.notified().await;
                },
            ));
            tracing::info!(addr = %http_addr, "router serving the OpenAI-compatible HTTP API");
            // Before DSV2_READY: whoever waits for that line finds both addresses.
            println!("DSV2_HTTP_READY {http_addr}");
            (Some(state), Some(server))
        }
        None => (None, None),
    };
    if let Some(m) = c.metrics_listen {
        let bound = dsv2_router::metrics::serve(m, engine.clone(), shard_stats.clone())
            .await
            .with_context(|| format!("binding --metrics-listen {m}"))?;
        tracing::info!(addr = %bound, "metrics on /metrics");
        println!("DSV2_METRICS_READY {bound}");
    }
    println!("DSV2_READY {addr}");

    // Log throughput every 10 s while busy, so operators see what the service is doing.
    let gauges = engine.gauges.clone();
    tokio::spawn(async move {
        let mut last = 0u64;
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let toks = gauges
                .generated_tokens
                .load(std::sync::atomic::Ordering::Relaxed);
            if toks != last {
                tracing::info!(
                    tokens_per_s = (toks - last) as f64 / 10.0,
                    running = gauges.running.load(std::sync::atomic::Ordering::Relaxed),
                    waiting = gauges.waiting.load(std::sync::atomic::Ordering::Relaxed),
                    free_blocks = gauges
                        .free_blocks
                        .load(std::sync::atomic::Ordering::Relaxed),
                    "engine"
                );
                last = toks;
            }
        }
    });

    let stop = Arc::new(tokio::sync::Notify::new());
    let stop_server = stop.clone();
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(
            // The token check outermost: a refused call takes no in-flight permit.
            tower::ServiceBuilder::new()
                .layer(RequireBearerLayer(tokens))
                .layer(inference_layers)
                .named_layer(InferenceServer::new(api)),
        )
        .serve_with_incoming_shutdown(
            // TCP_NODELAY on the accepted sockets (small messages, one token or one row, must
            // not wait on Nagle), TLS with --tls-cert.
            Incoming::new(listener, grpc_tls)?,
            async move {
                stop_server.notified().await;
            },
        );
    let mut server = tokio::spawn(server);
    tokio::select! {
        r = &mut server => {
            r.context("gRPC server task")?.context("gRPC server failed")?;
            return Ok(());
        }
        r = async {
            match http_server.as_mut() {
                Some(h) => h.await,
                None => std::future::pending().await,
            }
        } => {
            r.context("HTTP server task")?.context("HTTP server failed")?;
            bail!("the HTTP server stopped");
        }
        _ = dsv2_server::shutdown_signal() => {}
    }
    tracing::info!(
        in_flight = engine.in_flight(),
        "shutdown requested: health NOT_SERVING, draining"
    );
    health_reporter
        .set_not_serving::<InferenceServer<InferenceApi>>()
        .await;
    health_reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    if let Some(h) = &http_api {
        h.set_not_serving();
    }
    stop.notify_one();
    http_stop.notify_one();
    // New connections are refused now; in-flight requests get the drain timeout to finish.
    let drained = async {
        let _ = server.await;
        if let Some(h) = http_server.take() {
            let _ = h.await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(c.drain_timeout_s), drained)
        .await
        .is_err()
    {
        tracing::warn!(
            left = engine.in_flight(),
            "drain timeout reached; stopping with requests in flight"
        );
    }
    tracing::info!(left = engine.in_flight(), "router stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("dsv2-router").chain(args.iter().copied()))
    }

    #[test]
    fn kv_cache_dtype_parses_and_a_bad_one_says_what_is_accepted() {
        assert_eq!(
            parse(&[]).map(|c| c.kv_cache_dtype).ok(),
            Some(KvCacheDtype::Bf16)
        );
        let c = parse(&["--kv-cache-dtype", "fp8"]).map(|c| c.kv_cache_dtype);
        assert_eq!(c.ok(), Some(KvCacheDtype::Fp8));
        let e = parse(&["--kv-cache-dtype", "int8"])
            .err()
            .map(|e| e.to_string());
        let e = e.unwrap_or_default();
        assert!(e.contains("bf16 or fp8"), "{e}");
    }

    #[test]
    fn kv_cache_gb_counts_blocks_of_the_dtype() {
        // DeepSeek-V2, 60 layers, blocks of 16: bf16 1152 B and fp8 656 B a token and layer
        let (bf16, fp8) = (60 * 16 * 1152u64, 60 * 16 * 656u64);
        let c = parse(&["--kv-cache-gb", "10"]).ok();
        let c = c.as_ref();
        let nb = c.and_then(|c| c.cache_blocks(bf16).ok());
        let n8 = c.and_then(|c| c.cache_blocks(fp8).ok());
        assert_eq!(nb, Some(((10u64 << 30) / bf16) as usize));
        assert_eq!(n8, Some(((10u64 << 30) / fp8) as usize));
        // fp8 fits 1152 / 656 = 1.76 x the tokens
        let r = n8.unwrap_or(0) as f64 / nb.unwrap_or(1) as f64;
        assert!((r - 1152.0 / 656.0).abs() < 1e-3, "{r}");
        // without it, --kv-cache-blocks (default 2048) whatever the bytes
        assert_eq!(
            parse(&[]).ok().and_then(|c| c.cache_blocks(fp8).ok()),
            Some(2048)
        );
        let e = parse(&["--kv-cache-gb", "0.0001"])
            .ok()
            .and_then(|c| c.cache_blocks(fp8).err())
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("holds no cache block"), "{e}");
        assert!(parse(&["--kv-cache-gb", "1", "--kv-cache-blocks", "64"]).is_err());
    }
}
