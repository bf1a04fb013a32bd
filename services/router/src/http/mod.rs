//! The OpenAI-compatible HTTP API on `--http-listen`: `POST /v1/completions` and
//! `POST /v1/chat/completions` (whole, or as server-sent events ending with `data: [DONE]`),
//! `GET /v1/models` and `GET /health`.
//!
//! A thin front on `dsv2.v1.Inference`, not a second server: each body becomes a
//! GenerateRequest (`request`) and runs through the gRPC handlers themselves, so validation,
//! chat templates, the engine, the in-flight limit (`--max-concurrent`, shared with gRPC) and the
//! request timeout are the same code. A failure keeps its gRPC code and message; its HTTP status
//! and OpenAI error type come from `status::http_status`, the table next to the gRPC one. So are
//! metrics and traces: a request is marked `Api::Http` and its `traceparent` header becomes
//! gRPC metadata; only what fails before the gRPC handler (the body, the limit) is counted here.

mod auth;
pub mod request;
pub mod response;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use dsv2_proto::inference::v1::inference_server::Inference;
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tonic::Status;

use crate::limits::{Arrival, ArrivalLayer, InFlightLimitLayer};
use crate::metrics::Api;
use crate::service::InferenceApi;
use crate::status;
use request::Endpoint;
use response::{Meta, SseEncoder};

/// What the HTTP handlers share.
pub struct HttpApi {
    api: InferenceApi,
    limit: InFlightLimitLayer,
    /// Unix seconds when the router started (`created` of /v1/models).
    started: u64,
    next_id: AtomicU64,
    serving: AtomicBool,
}

impl HttpApi {
    /// `limit` must be the layer in front of gRPC's Inference, so both APIs share its permits.
    pub fn new(api: InferenceApi, limit: InFlightLimitLayer) -> Arc<HttpApi> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Arc::new(HttpApi {
            api,
            limit,
            started: now.as_secs(),
            // Ids differ across restarts without a random source: they start at the clock.
            next_id: AtomicU64::new(now.as_nanos() as u64),
            serving: AtomicBool::new(true),
        })
    }

    /// From now on /health answers 503 (the router is draining).
    pub fn set_not_serving(&self) {
        self.serving.store(false, Ordering::Relaxed);
    }

    fn meta(&self, endpoint: Endpoint, logprobs: bool) -> Meta {
        let prefix = match endpoint {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        };
        Meta {
            endpoint,
            id: format!(
                "{prefix}-{:016x}",
                self.next_id.fetch_add(1, Ordering::Relaxed)
            ),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            model: self.api.facts.model_name.clone(),
            logprobs,
        }
    }
}

/// Largest request body: gRPC's default message limit, which the public gRPC API keeps.
const MAX_BODY_BYTES: usize = 4 << 20;

/// The routes, with the arrival stamp that the request timeout counts from.
pub fn router(state: Arc<HttpApi>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(not_found)
        .with_state(state)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(ArrivalLayer)
}

/// Serves the API on `listener` until `shutdown` resolves, then until the open answers
/// (streams included) have ended.
/// `incoming` sets TCP_NODELAY (small SSE events must not wait on Nagle) and does TLS when
/// configured; with `tokens`, /v1/* needs a bearer token.
pub async fn serve(
    incoming: dsv2_security::server::Incoming,
    state: Arc<HttpApi>,
    tokens: Option<dsv2_security::auth::Tokens>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut app = router(state);
    if let Some(t) = tokens {
        app = app.layer(axum::middleware::from_fn_with_state(
            t,
            auth::require_bearer,
        ));
    }
    axum::serve(auth::HttpIncoming(incoming), app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// An OpenAI error answer. `param`: the request field the failure names.
fn error_response(st: &Status, param: Option<&str>) -> Response {
    let (code, _) = status::http_status(st.code());
    (code, json_body(&response::error(st, param))).into_response()
}

/// A failure of the gRPC path: its field named as the HTTP API names it (`max_new_tokens` is
/// `max_tokens`, a chat's `prompt` is `messages`).
fn grpc_error(endpoint: Endpoint, st: &Status) -> Response {
    let Some(field) = status::field_of(st.message()) else {
        return error_response(st, None);
    };
    let name = endpoint.field_name(field);
    let rest = &st.message()[field.len()..];
    let msg = format!("{name}{}", rest.replace("max_new_tokens", "max_tokens"));
    error_response(&Status::new(st.code(), msg), Some(&name))
}

fn json_body(v: &Value) -> ([(header::HeaderName, &'static str); 1], String) {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string())
}

async fn completions(
    State(s): State<Arc<HttpApi>>,
    arrival: Option<Extension<Arrival>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(s, Endpoint::Completions, arrival, &headers, body).await
}

async fn chat_completions(
    State(s): State<Arc<HttpApi>>,
    arrival: Option<Extension<Arrival>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(s, Endpoint::Chat, arrival, &headers, body).await
}

/// The W3C trace context headers, as the gRPC metadata the handlers read them from.
fn trace_metadata(headers: &HeaderMap, md: &mut tonic::metadata::MetadataMap) {
    use dsv2_server::telemetry::{TRACEPARENT, TRACESTATE};
    for key in [TRACEPARENT, TRACESTATE] {
        if let Some(v) = headers
            .get(key)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
        {
            md.insert(key, v);
        }
    }
}

async fn generate(
    s: Arc<HttpApi>,
    endpoint: Endpoint,
    arrival: Option<Extension<Arrival>>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = arrival.map_or_else(Instant::now, |a| a.0.0);
    let metrics = &s.api.engine.metrics;
    let body = match body {
        Ok(b) => b,
        // Too large (413) or unreadable: axum's status, OpenAI's error shape.
        Err(r) => {
            let st = Status::invalid_argument(format!("the body: {}", r.body_text()));
            metrics.request_ended(Api::Http, st.code());
            return (r.status(), json_body(&response::error(&st, None))).into_response();
        }
    };
    let parsed = match request::parse(endpoint, &body, &s.api.facts.model_name) {
        Ok(p) => p,
        Err(st) => {
            metrics.request_ended(Api::Http, st.code());
            return error_response(&st, status::field_of(st.message()));
        }
    };
    // Held until the answer has ended (for a stream: moved into its body).
    let permit = match s.limit.try_acquire() {
        Ok(p) => p,
        Err(st) => {
            metrics.request_ended(Api::Http, st.code());
            return error_response(&st, None);
        }
    };
    let meta = s.meta(endpoint, parsed.logprobs);
    let mut req = tonic::Request::new(parsed.grpc);
    req.extensions_mut().insert(Arrival(arrived));
    req.extensions_mut().insert(Api::Http);
    trace_metadata(headers, req.metadata_mut());
    if !parsed.stream {
        // No timeout layer wraps this API: the router's request timeout is the deadline.
        let deadline = s.api.request_timeout.map(|d| arrived + d);
        let answer = s.api.generate_until(req, deadline).await;
        drop(permit);
        return match answer {
            Ok(r) => (
                StatusCode::OK,
                json_body(&response::whole(&meta, r.get_ref())),
            )
                .into_response(),
            Err(st) => grpc_error(endpoint, &st),
        };
    }
    // GenerateStream bounds the stream by the request timeout itself.
    let mut stream = match s.api.generate_stream(req).await {
        Ok(r) => r.into_inner(),
        Err(st) => return grpc_error(endpoint, &st),
    };
    // Wait for the first message before the status line: a request that fails before its
    // first token (queue full, a shard lost, the deadline) still gets its HTTP status.
    let first = match stream.next().await {
        Some(Ok(m)) => m,
        Some(Err(st)) => return grpc_error(endpoint, &st),
        None => {
            return error_response(
                &Status::internal("the engine stopped before the request started"),
                None,
            );
        }
    };
    let mut enc = SseEncoder::new(meta, parsed.include_usage);
    let head = enc.encode(Ok(first));
    let rest = stream.map(move |item| {
        // The permit lives as long as the body: dropped when the stream ends or the client
        // goes away (which drops the gRPC stream, and the engine cancels the request).
        let _held = &permit;
        Ok::<_, std::convert::Infallible>(Bytes::from(enc.encode(item)))
    });
    let body = tokio_stream::once(Ok(Bytes::from(head))).chain(rest);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|e| {
            error_response(
                &Status::internal(format!("building the response: {e}")),
                None,
            )
        })
}

async fn models(State(s): State<Arc<HttpApi>>) -> Response {
    let f = &s.api.facts;
    let v = json!({
        "object": "list",
        "data": [{
            "id": f.model_name,
            "object": "model",
            "created": s.started,
            "owned_by": "dsv2",
            "max_model_len": f.max_context_tokens,
        }],
    });
    (StatusCode::OK, json_body(&v)).into_response()
}

async fn health(State(s): State<Arc<HttpApi>>) -> Response {
    if s.serving.load(Ordering::Relaxed) {
        (StatusCode::OK, json_body(&json!({"status": "ok"}))).into_response()
    } else {
        error_response(&status::shutting_down(), None)
    }
}

async fn not_found(uri: axum::http::Uri) -> Response {
    error_response(
        &Status::not_found(format!(
            "no route {}: this server has POST /v1/completions, POST /v1/chat/completions, \
             GET /v1/models and GET /health",
            uri.path()
        )),
        None,
    )
}
