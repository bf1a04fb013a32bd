//! `dsv2-expert`: an expert shard. Loads only its routed experts (memory-mapped, filtered by
//! name), answers Info, and serves one Forward stream per router: per MoE layer, the rows routed
//! here with their expert ids and gate weights in, weighted partial sums out. Stateless per
//! request, so shards restart and replicate freely. With --metrics-listen it serves Prometheus
//! metrics (`dsv2_expert_*`: Forward latency, rows and experts per layer, errors); each Forward
//! runs in a `forward` span whose parent is the router span the request names (`traceparents`),
//! exported over OTLP with --otlp-endpoint.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Multi-MB message buffers come and go every MoE layer: glibc hands them back to the kernel
/// and faults them in again (half the loopback round trip at 256 rows, bench/RESULTS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result, bail};
use clap::Parser;
use dsv2_core::ModelConfig;
use dsv2_core::backend::{Backend, DeviceSpec};
use dsv2_core::cpu::CpuBackend;
use dsv2_core::model::{ExpertSelection, LocalExperts};
use dsv2_core::placement::{Placement, parse_expert_list};
use dsv2_core::routing::Routing;
use dsv2_core::weights::WeightStore;
use dsv2_cuda_backend::CudaBackend;
use dsv2_nccl_experts::{NcclJoin, shard_join_handler};
use dsv2_proto::expert::v1::expert_shard_server::{ExpertShard, ExpertShardServer};
use dsv2_proto::expert::v1::{
    Dtype, ForwardRequest, ForwardResponse, InfoRequest, InfoResponse, NcclInitRequest,
    NcclInitResponse, ShardError, ShardErrorCode,
};
use dsv2_proto::tensor::{decode_rows_to_f32, encode_f32, encode_f32_as_bf16};
use dsv2_security::auth::{RequireBearerLayer, Tokens};
use dsv2_security::server::{ALPN_GRPC, Incoming};
use dsv2_server::metrics::{
    CounterVec, Exposition, FAST_SECONDS, Histogram, IndexedHistograms, POWERS_OF_TWO,
};
use dsv2_server::{LogFormat, Transport};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::service::LayerExt;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::ServingStatus;

#[derive(Parser, Debug)]
#[command(
    name = "dsv2-expert",
    version,
    about = "DeepSeek-V2 expert shard: serves the forward pass of a subset of the routed experts"
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
    /// Address to serve on (port 0 picks a free port; printed as `DSV2_READY <addr>` on stdout).
    #[arg(long, default_value = "0.0.0.0:50061")]
    listen: SocketAddr,
    /// TLS; with --tls-client-ca only a router presenting a certificate of that CA gets in.
    #[command(flatten)]
    tls: dsv2_security::args::ServerTlsArgs,
    /// Tokens (one a line, re-read when the file changes) the router must send as
    /// `authorization: Bearer` (its --shard-token) on every dsv2.expert.v1 call; health and
    /// reflection stay open.
    #[arg(long, env = "DSV2_SHARD_TOKEN_FILE", value_name = "FILE")]
    shard_token_file: Option<std::path::PathBuf>,
    /// Experts to host, e.g. 0-79 or 0,3,8-15.
    #[arg(long, conflicts_with_all = ["shard_index", "num_shards"])]
    experts: Option<String>,
    /// This shard's index under the default placement (with --num-shards).
    #[arg(long, requires = "num_shards")]
    shard_index: Option<usize>,
    /// Number of shards in the default placement (with --shard-index).
    #[arg(long, requires = "shard_index")]
    num_shards: Option<usize>,
    /// Each expert on this many shards (with --shard-index; the router's --replicas): this
    /// shard also hosts the experts of the next replicas-1 shards of the default placement.
    #[arg(long, default_value_t = 1, requires = "shard_index")]
    replicas: usize,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Data plane: grpc (Forward streams), or nccl (also accept the router's NcclInit and serve
    /// the layers over NCCL on this GPU; needs --device cuda:N). Forward stays available.
    #[arg(long, value_enum, default_value = "grpc")]
    transport: Transport,
    /// Serve Prometheus metrics (GET /metrics) on this address, e.g. 0.0.0.0:9091 (port 0 picks
    /// a free port, printed as `DSV2_METRICS_READY <addr>` on stdout before DSV2_READY).
    #[arg(long, env = "DSV2_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Export trace spans over OTLP/gRPC to this collector, e.g. http://otel-collector:4317
    /// (service name dsv2-expert). Each Forward's span is a child of the router span that sent it.
    #[arg(long, env = "DSV2_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    #[arg(long, value_enum, env = "DSV2_LOG_FORMAT", default_value = "human")]
    log_format: LogFormat,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, env = "DSV2_LOG", default_value = "info")]
    log_level: String,
}

struct Shard<B: Backend> {
    experts: Arc<LocalExperts<B>>,
    backend: Arc<B>,
    info: InfoResponse,
    hosted: Vec<bool>,
    moe_layer: Vec<bool>,
    /// The NcclInit handler (GPU shards started with --transport nccl).
    nccl: Option<NcclJoin>,
    metrics: Arc<ShardMetrics>,
}

/// What the gRPC Forward path observes (the NCCL data plane is not counted here).
struct ShardMetrics {
    forward_duration: Histogram,
    /// Per MoE layer: rows of one Forward, and the distinct experts they use.
    rows: IndexedHistograms,
    experts: IndexedHistograms,
    /// Failed Forwards by ShardErrorCode (`invalid_argument`, `expert_not_hosted`, ...).
    errors: CounterVec,
    /// Router streams open now.
    streams: AtomicUsize,
    hosted_experts: usize,
}

impl ShardMetrics {
    fn new(moe_layer: &[bool], hosted_experts: usize) -> Self {
        ShardMetrics {
            forward_duration: Histogram::new(FAST_SECONDS),
            rows: IndexedHistograms::new(moe_layer, POWERS_OF_TWO),
            experts: IndexedHistograms::new(moe_layer, POWERS_OF_TWO),
            errors: CounterVec::new(&["code"]),
            streams: AtomicUsize::new(0),
            hosted_experts,
        }
    }

    fn render(&self) -> String {
        let mut e = Exposition::new();
        e.gauge(
            "dsv2_expert_hosted_experts",
            "Routed experts this shard hosts (in every MoE layer).",
            self.hosted_experts,
        );
        e.gauge(
            "dsv2_expert_forward_streams",
            "Forward streams open (one per router).",
            self.streams.load(Ordering::Relaxed),
        );
        e.histogram(
            "dsv2_expert_forward_duration_seconds",
            "Time to serve one Forward request (one MoE layer's rows): decode, expert FFNs, encode.",
            &self.forward_duration,
        );
        e.histogram_vec(
            "dsv2_expert_forward_rows",
            "Hidden rows (tokens) in one Forward request, by decoder layer.",
            "layer",
            self.rows.series(),
        );
        e.histogram_vec(
            "dsv2_expert_forward_experts",
            "Distinct experts of this shard that one Forward request uses, by decoder layer.",
            "layer",
            self.experts.series(),
        );
        e.counter_vec(
            "dsv2_expert_forward_errors_total",
            "Forward requests answered with a ShardError, by its code.",
            &self.errors,
        );
        e.finish()
    }
}

/// `SHARD_ERROR_CODE_EXPERT_NOT_HOSTED` → `expert_not_hosted`.
fn error_label(code: i32) -> String {
    let name = ShardErrorCode::try_from(code)
        .unwrap_or(ShardErrorCode::Unspecified)
        .as_str_name();
    name.trim_start_matches("SHARD_ERROR_CODE_")
        .to_ascii_lowercase()
}

/// Distinct expert ids among `ids` (padding slots excluded).
fn distinct_experts(ids: &[u32], num_experts: usize) -> usize {
    let mut seen = vec![false; num_experts];
    let mut n = 0;
    for &e in ids {
        if let Some(s) = seen.get_mut(e as usize)
            && !*s
        {
            *s = true;
            n += 1;
        }
    }
    n
}

/// Builds the NcclInit handler from the loaded experts (CUDA only): (experts, hosted, moe
/// layers, hidden size).
type NcclMaker<B> =
    Box<dyn FnOnce(Arc<LocalExperts<B>>, Vec<bool>, Vec<bool>, usize) -> NcclJoin + Send>;

fn shard_error(code: ShardErrorCode, req: &ForwardRequest, message: String) -> ForwardResponse {
    ForwardResponse {
        request_id: req.request_id,
        layer: req.layer,
        error: Some(ShardError {
            code: code as i32,
            message,
        }),
        ..Default::default()
    }
}

impl<B: Backend> Shard<B> {
    /// `forward`, measured.
    fn forward_observed(&self, req: ForwardRequest) -> ForwardResponse {
        let t0 = Instant::now();
        let (layer, rows) = (req.layer as usize, req.num_rows);
        let experts = distinct_experts(&req.expert_ids, self.hosted.len());
        let resp = self.forward(req);
        let m = &self.metrics;
        match &resp.error {
            Some(err) => m.errors.inc(&[&error_label(err.code)]),
            None => {
                m.forward_duration.observe_duration(t0.elapsed());
                if let Some(h) = m.rows.get(layer) {
                    h.observe(rows as f64);
                }
                if let Some(h) = m.experts.get(layer) {
                    h.observe(experts as f64);
                }
            }
        }
        let span = tracing::Span::current();
        span.record("experts", experts);
        if let Some(err) = &resp.error {
            span.record("error", err.message.as_str());
        }
        resp
    }

    /// One MoE layer's share; errors become a ShardError answer, never a dead stream.
    fn forward(&self, req: ForwardRequest) -> ForwardResponse {
        let t0 = Instant::now();
        if let Err(e) = req.check_shape() {
            return shard_error(ShardErrorCode::InvalidArgument, &req, e.to_string());
        }
        let (rows, h, k) = (
            req.num_rows as usize,
            req.hidden_size as usize,
            req.experts_per_row as usize,
        );
        if h != self.info.hidden_size as usize {
            return shard_error(
                ShardErrorCode::InvalidArgument,
                &req,
                format!("hidden_size {h} != model's {}", self.info.hidden_size),
            );
        }
        if !self
            .moe_layer
            .get(req.layer as usize)
            .copied()
            .unwrap_or(false)
        {
            return shard_error(
                ShardErrorCode::InvalidArgument,
                &req,
                format!("layer {} is not a MoE layer", req.layer),
            );
        }
        if let Some(e) = req.expert_ids.iter().find(|&&e| {
            e != dsv2_core::routing::NO_EXPERT
                && !self.hosted.get(e as usize).copied().unwrap_or(false)
        }) {
            return shard_error(
                ShardErrorCode::ExpertNotHosted,
                &req,
                format!("expert {e} is not hosted by this shard"),
            );
        }
        let dtype = match Dtype::try_from(req.hidden_dtype) {
            Ok(Dtype::F32) => Dtype::F32,
            _ => Dtype::Bf16,
        };
        let x = match decode_rows_to_f32("hidden", dtype, &req.hidden, rows, h) {
            Ok(x) => x,
            Err(e) => return shard_error(ShardErrorCode::InvalidArgument, &req, e.to_string()),
        };
        let routing = Routing {
            top_k: k,
            ids: req.expert_ids.clone(),
            weights: req.gate_weights.clone(),
        };
        let out = self
            .backend
            .act_from_host(rows, h, &x)
            .and_then(|act| self.experts.forward(req.layer as usize, &act, &routing))
            .and_then(|y| self.backend.act_to_host(&y));
        let y = match out {
            Ok(y) => y,
            Err(e) => return shard_error(ShardErrorCode::Internal, &req, e.to_string()),
        };
        let (partial, dtype) = match Dtype::try_from(req.partial_dtype) {
            Ok(Dtype::F32) => (encode_f32(&y), Dtype::F32),
            _ => (encode_f32_as_bf16(&y), Dtype::Bf16),
        };
        ForwardResponse {
            request_id: req.request_id,
            layer: req.layer,
            num_rows: req.num_rows,
            hidden_size: req.hidden_size,
            dtype: dtype as i32,
            partial,
            compute_time_ns: t0.elapsed().as_nanos() as u64,
            error: None,
        }
    }
}

#[derive(Clone)]
struct Service<B: Backend>(Arc<Shard<B>>);

type ForwardStream = Pin<Box<dyn Stream<Item = Result<ForwardResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<B: Backend> ExpertShard for Service<B> {
    async fn info(&self, _r: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(self.0.info.clone()))
    }

    type ForwardStream = ForwardStream;

    async fn forward(
        &self,
        request: Request<Streaming<ForwardRequest>>,
    ) -> Result<Response<ForwardStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let shard = self.0.clone();
        tokio::spawn(async move {
            tracing::info!("router connected");
            shard.metrics.streams.fetch_add(1, Ordering::Relaxed);
            while let Some(msg) = inbound.next().await {
                let req = match msg {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::info!(error = %e.message(), "router stream ended");
                        break;
                    }
                };
                let s = shard.clone();
                let span = forward_span(&req);
                // Expert math is CPU-bound: keep it off the async workers.
                let resp = match tokio::task::spawn_blocking(move || {
                    span.in_scope(|| s.forward_observed(req))
                })
                .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "expert computation panicked");
                        break;
                    }
                };
                if tx.send(Ok(resp)).await.is_err() {
                    break;
                }
            }
            shard.metrics.streams.fetch_sub(1, Ordering::Relaxed);
            tracing::info!("router disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    /// Joins the router's NCCL communicator (GPU shards started with --transport nccl); any
    /// other shard answers why it cannot, so the router's error names the fix.
    async fn nccl_init(
        &self,
        r: Request<NcclInitRequest>,
    ) -> Result<Response<NcclInitResponse>, Status> {
        let Some(join) = self.0.nccl.clone() else {
            return Ok(Response::new(NcclInitResponse {
                ok: false,
                error: format!(
                    "this dsv2-expert ({}) serves the gRPC data plane only; start it with --device cuda:N --transport nccl",
                    self.0.info.device
                ),
            }));
        };
        let req = r.into_inner();
        tracing::info!(
            rank = req.rank,
            world = req.world_size,
            "NcclInit from the router"
        );
        let resp = tokio::task::spawn_blocking(move || join(&req))
            .await
            .map_err(|e| Status::internal(format!("NCCL join task failed: {e}")))?;
        Ok(Response::new(resp))
    }
}

/// The span of one Forward request: a child of the first router span it names, linked to the
/// others (the other requests of the router's step).
fn forward_span(req: &ForwardRequest) -> tracing::Span {
    let span = tracing::info_span!(
        "forward",
        otel.kind = "server",
        layer = req.layer,
        rows = req.num_rows,
        experts = tracing::field::Empty,
        error = tracing::field::Empty,
    );
    let mut parents = req.traceparents.iter();
    if let Some(first) = parents.next() {
        dsv2_server::telemetry::set_remote_parent(&span, first, None);
    }
    for other in parents {
        dsv2_server::telemetry::add_remote_link(&span, other);
    }
    span
}

fn main() -> Result<()> {
    let c = Config::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let telemetry = dsv2_server::telemetry::init(
        "dsv2-expert",
        &c.log_level,
        c.log_format,
        "info",
        c.otlp_endpoint.as_deref(),
        rt.handle(),
    )
    .map_err(anyhow::Error::msg)?;
    let served = rt.block_on(serve(c));
    // Off the runtime's workers, while it still runs the export of the last spans.
    telemetry.shutdown();
    served
}

async fn serve(c: Config) -> Result<()> {
    match c.device {
        DeviceSpec::Cpu => {
            if c.transport == Transport::Nccl {
                bail!(
                    "--transport nccl moves GPU buffers: it needs --device cuda:N; use --transport grpc on the CPU"
                );
            }
            serve_on(c, Arc::new(CpuBackend), None).await
        }
        DeviceSpec::Cuda(n) => {
            let backend = dsv2_cuda_backend::open(n)
                .map_err(|e| anyhow::anyhow!("--device cuda:{n}: {e}"))?;
            let nccl: Option<NcclMaker<CudaBackend>> = if c.transport == Transport::Nccl {
                let b = backend.clone();
                Some(Box::new(move |experts, hosted, moe_layer, hidden| {
                    shard_join_handler(b, experts, hosted, moe_layer, hidden)
                }))
            } else {
                None
            };
            serve_on(c, backend, nccl).await
        }
    }
}

async fn serve_on<B: Backend>(
    c: Config,
    backend: Arc<B>,
    nccl: Option<NcclMaker<B>>,
) -> Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    // Read before the experts load: a bad certificate, key or token file fails at once.
    let tls = dsv2_security::server::ServerTls::from_args(&c.tls, ALPN_GRPC)?;
    let tokens = c
        .shard_token_file
        .clone()
        .map(|f| Tokens::from_file("--shard-token-file", f))
        .transpose()?;
    let dir = dsv2_server::resolve_model_dir(&c.model_dir)?;
    let cfg = ModelConfig::from_model_dir(&dir)?;
    let experts: Vec<usize> = match (&c.experts, c.shard_index, c.num_shards) {
        (Some(list), _, _) => parse_expert_list(list)?,
        (None, Some(i), Some(n)) => {
            let p = Placement::default_for(&cfg, n)?.replicated(c.replicas)?;
            p.shards.get(i).cloned().with_context(|| {
                format!("--shard-index {i} is out of range for --num-shards {n}")
            })?
        }
        _ => bail!("say which experts to host: --experts 0-79, or --shard-index I --num-shards N"),
    };
    let t0 = Instant::now();
    let selection = ExpertSelection::Only(experts.clone());
    let store =
        WeightStore::open_or_random(&dir, c.random_weights, LocalExperts::<B>::wants(&selection))
            .with_context(|| format!("opening {}", dir.display()))?;
    let local = Arc::new(LocalExperts::load(
        backend.clone(),
        &cfg,
        &store,
        &selection,
    )?);
    tracing::info!(dir = %dir.display(), experts = experts.len(), secs = t0.elapsed().as_secs_f64(), "experts loaded");
    let mut hosted = vec![false; cfg.n_routed_experts];
    for &e in &experts {
        hosted[e] = true;
    }
    let info = InfoResponse {
        model_name: dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        config_fingerprint: cfg.fingerprint(),
        weights_fingerprint: store.fingerprint(),
        expert_ids: experts.iter().map(|&e| e as u32).collect(),
        moe_layers: cfg.moe_layers().iter().map(|&l| l as u32).collect(),
        hidden_size: cfg.hidden_size as u32,
        num_routed_experts: cfg.n_routed_experts as u32,
        dtype: Dtype::F32 as i32,
        device: backend.name(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let moe_layer: Vec<bool> = (0..cfg.num_hidden_layers)
        .map(|l| cfg.is_moe_layer(l))
        .collect();
    let nccl = nccl.map(|make| {
        tracing::info!("accepting the router's NcclInit (--transport nccl)");
        make(
            local.clone(),
            hosted.clone(),
            moe_layer.clone(),
            cfg.hidden_size,
        )
    });
    let metrics = Arc::new(ShardMetrics::new(&moe_layer, experts.len()));
    let shard = Shard {
        experts: local,
        backend,
        info,
        hosted,
        moe_layer,
        nccl,
        metrics: metrics.clone(),
    };
    // Both reflection versions: grpcurl speaks v1, older ghz builds v1alpha.
    let (reflection, reflection_alpha) = dsv2_server::reflection_services()?;
    let listener = tokio::net::TcpListener::bind(c.listen)
        .await
        .with_context(|| format!("binding {}", c.listen))?;
    let addr = listener.local_addr()?;
    health_reporter
        .set_serving::<ExpertShardServer<Service<B>>>()
        .await;
    health_reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    if let Some(m) = c.metrics_listen {
        let bound = dsv2_server::metrics::serve(m, move || {
            let metrics = metrics.clone();
            async move { metrics.render() }
        })
        .await
        .with_context(|| format!("binding --metrics-listen {m}"))?;
        tracing::info!(addr = %bound, "metrics on /metrics");
        println!("DSV2_METRICS_READY {bound}");
    }
    tracing::info!(%addr, "expert shard serving dsv2.expert.v1.ExpertShard");
    println!("DSV2_READY {addr}");
    let reporter = health_reporter.clone();
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(
            tower::ServiceBuilder::new()
                .layer(RequireBearerLayer(tokens))
                .named_layer(
                    ExpertShardServer::new(Service(Arc::new(shard)))
                        .max_decoding_message_size(1 << 30)
                        .max_encoding_message_size(1 << 30),
                ),
        )
        .serve_with_incoming_shutdown(
            // TCP_NODELAY on the accepted sockets (small messages, one row, must not wait on
            // Nagle), TLS with --tls-cert.
            Incoming::new(listener, tls)?,
            async move {
                dsv2_server::shutdown_signal().await;
                reporter
                    .set_service_status("", ServingStatus::NotServing)
                    .await;
                tracing::info!("shutting down");
            },
        )
        .await?;
    let _ = Duration::ZERO;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_become_short_labels() {
        assert_eq!(
            error_label(ShardErrorCode::ExpertNotHosted as i32),
            "expert_not_hosted"
        );
        assert_eq!(error_label(999), "unspecified");
    }

    #[test]
    fn distinct_experts_skip_padding() {
        let pad = dsv2_core::routing::NO_EXPERT;
        assert_eq!(distinct_experts(&[3, 5, 3, pad, 5, 0], 8), 3);
        assert_eq!(distinct_experts(&[], 8), 0);
    }
}
