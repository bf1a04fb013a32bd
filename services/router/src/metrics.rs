//! The router's Prometheus metrics on `--metrics-listen` (GET /metrics), named
//! `dsv2_router_<what>_<unit>`: per request (time to first token, time per output token,
//! end-to-end latency, queue wait, prompt and output lengths, outcomes by status code), per
//! engine step (batch size in sequences and tokens, KV cache use, step time), and the engine's
//! gauges and counters. deploy/grafana/dsv2-dashboard.json graphs them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use dsv2_server::metrics::{
    CounterVec, Exposition, FAST_SECONDS, Histogram, LATENCY_SECONDS, POWERS_OF_TWO, RATIO,
};
use tonic::Code;

use crate::engine_task::EngineHandle;

/// Buckets for per-step host work: a GPU decode step takes 1.5..3 ms (bench/RESULTS.md), so
/// tens of microseconds already show in served throughput.
const HOST_SECONDS: &[f64] = &[
    0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
];

/// Which front door a request came through (the `api` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Api {
    #[default]
    Grpc,
    Http,
}

impl Api {
    pub fn label(self) -> &'static str {
        match self {
            Api::Grpc => "grpc",
            Api::Http => "http",
        }
    }
}

/// What the request path and the engine thread observe; rendered with the engine's gauges.
#[derive(Debug)]
pub struct RouterMetrics {
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub request_duration: Histogram,
    pub queue_wait: Histogram,
    pub prompt_tokens: Histogram,
    pub output_tokens: Histogram,
    pub step_sequences: Histogram,
    pub step_tokens: Histogram,
    pub step_kv_cache_usage: Histogram,
    pub step_duration: Histogram,
    /// Per step, the engine thread's time outside the model and the token choice.
    pub step_host: Histogram,
    /// Finished generation requests by `api` and `code` (the gRPC status code's name; the HTTP
    /// API answers the HTTP status of `status::http_status` for it).
    pub requests: CounterVec,
}

impl Default for RouterMetrics {
    fn default() -> Self {
        RouterMetrics {
            time_to_first_token: Histogram::new(LATENCY_SECONDS),
            time_per_output_token: Histogram::new(FAST_SECONDS),
            request_duration: Histogram::new(LATENCY_SECONDS),
            queue_wait: Histogram::new(LATENCY_SECONDS),
            prompt_tokens: Histogram::new(POWERS_OF_TWO),
            output_tokens: Histogram::new(POWERS_OF_TWO),
            step_sequences: Histogram::new(POWERS_OF_TWO),
            step_tokens: Histogram::new(POWERS_OF_TWO),
            step_kv_cache_usage: Histogram::new(RATIO),
            step_duration: Histogram::new(LATENCY_SECONDS),
            step_host: Histogram::new(HOST_SECONDS),
            requests: CounterVec::new(&["api", "code"]),
        }
    }
}

impl RouterMetrics {
    /// A request that ended with `code` before or without producing tokens.
    pub fn request_ended(&self, api: Api, code: Code) {
        self.requests.inc(&[api.label(), code_name(code)]);
    }
}

/// `Code::InvalidArgument` → `INVALID_ARGUMENT`, as gRPC spells its codes.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// One generation request's measurements, from its arrival to its end. Whatever way the request
/// ends is counted once: `finished`, `failed`, or dropped unfinished (the client went away, or
/// the request timeout layer dropped the handler: CANCELLED, or DEADLINE_EXCEEDED once
/// `deadline` has passed).
pub struct RequestObserver {
    metrics: Arc<RouterMetrics>,
    api: Api,
    arrived: Instant,
    deadline: Option<Instant>,
    first_token: Option<Instant>,
    done: bool,
}

impl RequestObserver {
    pub fn new(
        metrics: Arc<RouterMetrics>,
        api: Api,
        arrived: Instant,
        deadline: Option<Instant>,
    ) -> Self {
        RequestObserver {
            metrics,
            api,
            arrived,
            deadline,
            first_token: None,
            done: false,
        }
    }

    /// A token arrived (the first one stops the time to first token).
    pub fn token(&mut self) {
        self.first_token.get_or_insert_with(Instant::now);
    }

    /// Time to first token so far (zero before it).
    pub fn ttft(&self) -> Duration {
        self.first_token
            .map(|t| t.saturating_duration_since(self.arrived))
            .unwrap_or_default()
    }

    /// The request finished normally.
    pub fn finished(&mut self, prompt_tokens: usize, completion_tokens: usize) {
        let m = &self.metrics;
        let now = Instant::now();
        if let Some(first) = self.first_token {
            m.time_to_first_token
                .observe_duration(first.saturating_duration_since(self.arrived));
            if completion_tokens > 1 {
                m.time_per_output_token.observe(
                    now.saturating_duration_since(first).as_secs_f64()
                        / (completion_tokens - 1) as f64,
                );
            }
        }
        m.request_duration
            .observe_duration(now.saturating_duration_since(self.arrived));
        m.prompt_tokens.observe(prompt_tokens as f64);
        m.output_tokens.observe(completion_tokens as f64);
        m.request_ended(self.api, Code::Ok);
        self.done = true;
    }

    /// The request failed with `code`.
    pub fn failed(&mut self, code: Code) {
        if !self.done {
            self.metrics.request_ended(self.api, code);
            self.done = true;
        }
    }
}

impl Drop for RequestObserver {
    fn drop(&mut self) {
        if !self.done {
            let late = self.deadline.is_some_and(|d| Instant::now() >= d);
            self.failed(if late {
                Code::DeadlineExceeded
            } else {
                Code::Cancelled
            });
        }
    }
}

pub fn render(engine: &EngineHandle) -> String {
    let g = &engine.gauges;
    let m = &engine.metrics;
    let mut e = Exposition::new();
    e.gauge(
        "dsv2_router_requests_in_flight",
        "Requests admitted and not finished (queued + running).",
        engine.in_flight(),
    );
    e.gauge(
        "dsv2_router_requests_waiting",
        "Requests waiting for cache room.",
        g.waiting.load(Ordering::Relaxed),
    );
    e.gauge(
        "dsv2_router_requests_running",
        "Requests in the running batch.",
        g.running.load(Ordering::Relaxed),
    );
    e.gauge(
        "dsv2_router_kv_cache_free_blocks",
        "Latent KV cache blocks a new request can take (free, or cached and held by no request).",
        g.free_blocks.load(Ordering::Relaxed),
    );
    e.gauge(
        "dsv2_router_kv_cache_blocks",
        "Latent KV cache blocks in all.",
        engine.num_blocks,
    );
    e.gauge(
        "dsv2_router_kv_cache_bytes",
        "Memory the latent KV cache takes (device memory on a GPU), bytes: blocks x block size x bytes per token of its dtype (--kv-cache-dtype).",
        engine.kv_cache_bytes,
    );
    e.gauge(
        "dsv2_router_kv_cache_cached_blocks",
        "Latent KV cache blocks holding a cached prompt prefix (held by requests or not; those held by none count as free too).",
        g.cached_blocks.load(Ordering::Relaxed),
    );
    e.counter(
        "dsv2_router_kv_cache_evicted_blocks_total",
        "Cached blocks evicted to make room.",
        g.evicted_blocks.load(Ordering::Relaxed),
    );
    e.counter(
        "dsv2_router_prefix_cache_queried_tokens_total",
        "Prompt tokens of admitted requests looked up in the prefix cache.",
        g.prefix_cache_queried_tokens.load(Ordering::Relaxed),
    );
    e.counter(
        "dsv2_router_prefix_cache_hit_tokens_total",
        "Prompt tokens found in the prefix cache (not prefilled).",
        g.prefix_cache_hit_tokens.load(Ordering::Relaxed),
    );
    let host_block_bytes = g.host_block_bytes.load(Ordering::Relaxed) as u64;
    e.gauge(
        "dsv2_router_kv_cache_host_blocks",
        "Blocks the prefix cache's host-memory tier can hold (0: no host tier, --host-cache-gb).",
        g.host_capacity_blocks.load(Ordering::Relaxed),
    );
    e.gauge(
        "dsv2_router_kv_cache_host_cached_blocks",
        "Blocks of cached prompt prefixes held in host memory (evicted from the device, or restored and kept).",
        g.host_cached_blocks.load(Ordering::Relaxed),
    );
    e.counter(
        "dsv2_router_prefix_cache_host_hit_tokens_total",
        "Prompt tokens copied back from the host tier instead of prefilled (part of the prefix cache's hit tokens).",
        g.host_hit_tokens.load(Ordering::Relaxed),
    );
    e.counter(
        "dsv2_router_kv_cache_host_restores_total",
        "Batches of blocks copied back from the host tier (one per admission round that restored any).",
        g.host_restores.load(Ordering::Relaxed),
    );
    let restored = g.host_restored_blocks.load(Ordering::Relaxed);
    e.counter(
        "dsv2_router_kv_cache_host_restored_blocks_total",
        "Blocks copied back from the host tier into the device cache.",
        restored,
    );
    e.counter(
        "dsv2_router_kv_cache_host_restored_bytes_total",
        "Bytes copied back from the host tier into the device cache.",
        restored * host_block_bytes,
    );
    let saved = g.host_saved_blocks.load(Ordering::Relaxed);
    e.counter(
        "dsv2_router_kv_cache_host_saved_blocks_total",
        "Evicted cached blocks copied from the device cache to the host tier.",
        saved,
    );
    e.counter(
        "dsv2_router_kv_cache_host_saved_bytes_total",
        "Bytes copied from the device cache to the host tier.",
        saved * host_block_bytes,
    );
    e.counter(
        "dsv2_router_kv_cache_host_evicted_blocks_total",
        "Blocks the host tier evicted (least recently used) to make room.",
        g.host_evicted_blocks.load(Ordering::Relaxed),
    );
    e.counter(
        "dsv2_router_engine_steps_total",
        "Model steps run.",
        g.steps.load(Ordering::Relaxed),
    );
    e.counter(
        "dsv2_router_generated_tokens_total",
        "Tokens generated.",
        g.generated_tokens.load(Ordering::Relaxed),
    );
    e.counter_vec(
        "dsv2_router_requests_total",
        "Generation requests (gRPC Generate/GenerateStream, HTTP completions) by front door and outcome: code is the gRPC status code's name (OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, UNAVAILABLE, CANCELLED, ...).",
        &m.requests,
    );
    e.histogram(
        "dsv2_router_time_to_first_token_seconds",
        "From a request's arrival to its first generated token.",
        &m.time_to_first_token,
    );
    e.histogram(
        "dsv2_router_time_per_output_token_seconds",
        "Per request, the mean time between generated tokens after the first.",
        &m.time_per_output_token,
    );
    e.histogram(
        "dsv2_router_request_duration_seconds",
        "End-to-end latency of a finished request, from arrival to its last token.",
        &m.request_duration,
    );
    e.histogram(
        "dsv2_router_queue_wait_seconds",
        "From a request's submission to the engine to its admission into the running batch.",
        &m.queue_wait,
    );
    e.histogram(
        "dsv2_router_request_prompt_tokens",
        "Prompt length of a finished request, in tokens.",
        &m.prompt_tokens,
    );
    e.histogram(
        "dsv2_router_request_output_tokens",
        "Generated tokens of a finished request.",
        &m.output_tokens,
    );
    e.histogram(
        "dsv2_router_step_batch_sequences",
        "Sequences in one engine step (decoding and prefilling).",
        &m.step_sequences,
    );
    e.histogram(
        "dsv2_router_step_batch_tokens",
        "Tokens computed in one engine step (one per decoding sequence plus prefill chunks).",
        &m.step_tokens,
    );
    e.histogram(
        "dsv2_router_step_kv_cache_usage_ratio",
        "Fraction of the KV cache blocks held by requests as each engine step starts.",
        &m.step_kv_cache_usage,
    );
    e.histogram(
        "dsv2_router_step_duration_seconds",
        "Wall time of one engine step (the whole model, expert shards included).",
        &m.step_duration,
    );
    e.histogram(
        "dsv2_router_step_host_seconds",
        "Per engine step, the engine thread's wall time outside the model and the token choice (scheduling, detokenisation, stop strings, logprobs, event sends, metrics): time the next step waits for.",
        &m.step_host,
    );
    e.finish()
}

/// Serves GET /metrics until the process ends; returns the bound address. `shards`: the expert
/// shards' liveness and rows (`dsv2_router_shard_*`), when they travel over gRPC.
pub async fn serve(
    addr: SocketAddr,
    engine: EngineHandle,
    shards: Option<Arc<crate::shard_health::ShardStats>>,
) -> std::io::Result<SocketAddr> {
    let engine = Arc::new(engine);
    dsv2_server::metrics::serve(addr, move || {
        let (engine, shards) = (engine.clone(), shards.clone());
        async move {
            let mut text = render(&engine);
            if let Some(s) = &shards {
                text.push_str(&s.render());
            }
            text
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_counted_once_however_it_ends() {
        let m = Arc::new(RouterMetrics::default());
        let t0 = Instant::now();
        let mut ok = RequestObserver::new(m.clone(), Api::Http, t0, None);
        ok.token();
        ok.token();
        ok.finished(5, 2);
        drop(ok);
        let mut bad = RequestObserver::new(m.clone(), Api::Grpc, t0, None);
        bad.failed(Code::InvalidArgument);
        bad.failed(Code::Internal);
        drop(bad);
        drop(RequestObserver::new(m.clone(), Api::Grpc, t0, None));
        drop(RequestObserver::new(m.clone(), Api::Grpc, t0, Some(t0)));
        assert_eq!(m.requests.get(&["http", "OK"]), 1);
        assert_eq!(m.requests.get(&["grpc", "INVALID_ARGUMENT"]), 1);
        assert_eq!(m.requests.get(&["grpc", "INTERNAL"]), 0);
        assert_eq!(m.requests.get(&["grpc", "CANCELLED"]), 1);
        assert_eq!(m.requests.get(&["grpc", "DEADLINE_EXCEEDED"]), 1);
        assert_eq!(m.time_to_first_token.count(), 1);
        assert_eq!(m.time_per_output_token.count(), 1);
        assert_eq!(m.request_duration.count(), 1);
        assert_eq!(m.prompt_tokens.sum(), 5.0);
        assert_eq!(m.output_tokens.sum(), 2.0);
    }
}
