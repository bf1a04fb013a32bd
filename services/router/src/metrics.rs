//! Prometheus text exposition of the engine gauges on `--metrics-listen` (GET /metrics), named
//! `dsv2_router_<what>_<unit>`.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::engine_task::EngineHandle;

pub fn render(engine: &EngineHandle) -> String {
    let g = &engine.gauges;
    let mut s = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            s,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "dsv2_router_requests_in_flight",
        "gauge",
        "Requests admitted and not finished (queued + running).",
        engine.in_flight() as u64,
    );
    metric(
        "dsv2_router_requests_waiting",
        "gauge",
        "Requests waiting for cache room.",
        g.waiting.load(Ordering::Relaxed) as u64,
    );
    metric(
        "dsv2_router_requests_running",
        "gauge",
        "Requests in the running batch.",
        g.running.load(Ordering::Relaxed) as u64,
    );
    metric(
        "dsv2_router_kv_cache_free_blocks",
        "gauge",
        "Latent KV cache blocks a new request can take (free, or cached and held by no request).",
        g.free_blocks.load(Ordering::Relaxed) as u64,
    );
    metric(
        "dsv2_router_kv_cache_blocks",
        "gauge",
        "Latent KV cache blocks in all.",
        engine.num_blocks as u64,
    );
    metric(
        "dsv2_router_kv_cache_cached_blocks",
        "gauge",
        "Latent KV cache blocks holding a cached prompt prefix (held by requests or not; those held by none count as free too).",
        g.cached_blocks.load(Ordering::Relaxed) as u64,
    );
    metric(
        "dsv2_router_kv_cache_evicted_blocks_total",
        "counter",
        "Cached blocks evicted to make room.",
        g.evicted_blocks.load(Ordering::Relaxed),
    );
    metric(
        "dsv2_router_prefix_cache_queried_tokens_total",
        "counter",
        "Prompt tokens of admitted requests looked up in the prefix cache.",
        g.prefix_cache_queried_tokens.load(Ordering::Relaxed),
    );
    metric(
        "dsv2_router_prefix_cache_hit_tokens_total",
        "counter",
        "Prompt tokens found in the prefix cache (not prefilled).",
        g.prefix_cache_hit_tokens.load(Ordering::Relaxed),
    );
    metric(
        "dsv2_router_engine_steps_total",
        "counter",
        "Model steps run.",
        g.steps.load(Ordering::Relaxed),
    );
    metric(
        "dsv2_router_generated_tokens_total",
        "counter",
        "Tokens generated.",
        g.generated_tokens.load(Ordering::Relaxed),
    );
    s
}

/// Serves GET /metrics until the process ends.
/// `shards`: the expert shards' liveness and rows (`dsv2_router_shard_*`), when they travel
/// over gRPC.
pub async fn serve(
    addr: SocketAddr,
    engine: EngineHandle,
    shards: Option<Arc<crate::shard_health::ShardStats>>,
) -> std::io::Result<SocketAddr> {
    let engine = Arc::new(engine);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (engine, shards) = (engine.clone(), shards.clone());
            async move {
                let mut text = render(&engine);
                if let Some(s) = &shards {
                    text.push_str(&s.render());
                }
                ([("content-type", "text/plain; version=0.0.4")], text)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}
