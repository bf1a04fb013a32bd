//! `dsv2.v1.Inference`: requests are parsed into validated engine parameters at the edge,
//! queued on the engine, and answered from the engine's events (unary or streamed). Each
//! generation request runs in a `generate` span (a child of the client's `traceparent`) with a
//! `validate` span for the parsing, and is measured and counted by a `RequestObserver`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsv2_core::chat::ChatTemplate;
use dsv2_core::engine::{EngineEvent, FinishReason, GenerateParams, TokenLogprob};
use dsv2_core::tokenizer::Tokenizer;
use dsv2_proto::inference::v1 as pb;
use dsv2_proto::inference::v1::inference_server::Inference;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::engine_task::EngineHandle;
use crate::limits::Arrival;
use crate::metrics::{Api, RequestObserver, code_name};
use crate::request::RequestParser;
use crate::{status, trace};

/// Static facts reported by ModelInfo.
#[derive(Clone, Debug, Default)]
pub struct ModelFacts {
    pub model_name: String,
    pub config_fingerprint: String,
    pub weights_fingerprint: String,
    pub vocab_size: u32,
    pub max_context_tokens: u32,
    pub bos_token_id: u32,
    pub eos_token_ids: Vec<u32>,
    pub num_layers: u32,
    pub hidden_size: u32,
    pub num_routed_experts: u32,
    pub num_experts_per_token: u32,
    pub shard_endpoints: Vec<String>,
    pub device: String,
}

pub struct InferenceService {
    pub engine: EngineHandle,
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// Renders `messages` prompts; None: the model has no chat template.
    pub chat_template: Option<Arc<ChatTemplate>>,
    pub facts: ModelFacts,
    pub default_max_new_tokens: u32,
    /// The router's request timeout (`--request-timeout-s`). Unary calls are bounded by
    /// `limits::RequestTimeoutLayer`, which answers DEADLINE_EXCEEDED and drops the handler;
    /// that layer stops timing when a stream's response headers go out, so GenerateStream
    /// gives the engine this (or the client's shorter deadline) as the request's deadline.
    pub request_timeout: Option<Duration>,
}

impl InferenceService {
    /// The request's prompt ids and engine parameters (`request::RequestParser`).
    fn parse(&self, req: &pb::GenerateRequest) -> Result<(Vec<u32>, GenerateParams), Status> {
        RequestParser {
            tokenizer: self.tokenizer.as_deref(),
            chat_template: self.chat_template.as_deref(),
            model_name: &self.facts.model_name,
            default_max_new_tokens: self.default_max_new_tokens,
        }
        .parse(req)
    }

    /// The client's gRPC deadline (`grpc-timeout`), if it set one, counted from when the call
    /// reached the router (`limits::Arrival`; now, where no layer stamped it).
    fn client_deadline<T>(&self, req: &Request<T>) -> Option<Instant> {
        let timeout = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)?;
        Some(arrival(req) + timeout)
    }

    /// The span and the observer of a generation request (`rpc`: Generate or GenerateStream).
    /// The HTTP API marks its requests with `Api::Http` in the extensions.
    fn begin<T>(&self, req: &Request<T>, rpc: &'static str) -> (tracing::Span, RequestObserver) {
        let api = req.extensions().get::<Api>().copied().unwrap_or_default();
        let span = trace::request_span(rpc, api.label(), req.metadata());
        let obs = RequestObserver::new(
            self.engine.metrics.clone(),
            api,
            arrival(req),
            self.stream_deadline(req),
        );
        (span, obs)
    }

    /// The prompt and parameters of a request, in the `validate` span.
    fn validate(&self, req: &pb::GenerateRequest) -> Result<(Vec<u32>, GenerateParams), Status> {
        tracing::info_span!("validate").in_scope(|| self.parse(req))
    }

    /// A stream's deadline: the client's or the router's request timeout, whichever is sooner.
    fn stream_deadline<T>(&self, req: &Request<T>) -> Option<Instant> {
        let server = self.request_timeout.map(|d| arrival(req) + d);
        match (self.client_deadline(req), server) {
            (Some(c), Some(s)) => Some(c.min(s)),
            (c, s) => c.or(s),
        }
    }

    /// One entry per prompt token, as the proto says: `head` (the first token, which has no
    /// context, or the first prompt_logprobs_skip_tokens) without a logprob, then the engine's
    /// `rest`.
    fn prompt_lps(&self, head: &[u32], rest: &[TokenLogprob]) -> Vec<pb::TokenLogprob> {
        let bare = |&id: &u32| pb::TokenLogprob {
            token_id: id,
            text: self
                .tokenizer
                .as_ref()
                .map(|tk| tk.token_text(id))
                .unwrap_or_default(),
            logprob: None,
            top_logprobs: vec![],
        };
        head.iter()
            .map(bare)
            .chain(rest.iter().map(|l| self.lp(l)))
            .collect()
    }

    fn lp(&self, t: &TokenLogprob) -> pb::TokenLogprob {
        let text = |id: u32| {
            self.tokenizer
                .as_ref()
                .map(|tk| tk.token_text(id))
                .unwrap_or_default()
        };
        pb::TokenLogprob {
            token_id: t.token,
            text: text(t.token),
            logprob: Some(t.logprob),
            top_logprobs: t
                .top
                .iter()
                .map(|&(id, lp)| pb::TopLogprob {
                    token_id: id,
                    text: text(id),
                    logprob: lp,
                })
                .collect(),
        }
    }
}

/// gRPC's `grpc-timeout` header: an integer of at most 8 digits (the spec's limit, which also
/// keeps `n * 3600` and `now + timeout` far from overflowing) and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    if num.len() > 8 {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A finished request's counts and outcome, on its span.
fn record_finish(prompt: usize, cached: usize, completion: usize, reason: FinishReason) {
    let span = tracing::Span::current();
    span.record("prompt_tokens", prompt);
    span.record("cached_prompt_tokens", cached);
    span.record("completion_tokens", completion);
    span.record("finish_reason", tracing::field::debug(reason));
    span.record("code", "OK");
}

pub fn finish_to_pb(r: FinishReason) -> pb::FinishReason {
    match r {
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Eos => pb::FinishReason::Eos,
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
    }
}

/// The tonic-facing handle: a clonable pointer to the service state.
#[derive(Clone)]
pub struct InferenceApi(pub Arc<InferenceService>);

impl std::ops::Deref for InferenceApi {
    type Target = InferenceService;
    fn deref(&self) -> &InferenceService {
        &self.0
    }
}

/// When the call reached the router (`limits::Arrival`); now, where no layer stamped it.
fn arrival<T>(req: &Request<T>) -> Instant {
    req.extensions()
        .get::<Arrival>()
        .map_or_else(Instant::now, |a| a.0)
}

/// The prompt tokens whose prompt-logprob entries carry no logprob: the first, or the first
/// `prompt_logprobs_skip_tokens` (the engine reports the rest).
fn prompt_head(prompt: &[u32], params: &GenerateParams) -> Vec<u32> {
    let n = params.prompt_logprobs_skip_tokens.max(1).min(prompt.len());
    prompt[..n].to_vec()
}

type StreamOut = Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>;

impl InferenceApi {
    /// Generate without the deadline race (see `unary_deadline_margin`).
    async fn generate_unary(
        &self,
        request: Request<pb::GenerateRequest>,
        deadline: Option<Instant>,
        obs: &mut RequestObserver,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let t0 = Instant::now();
        let (prompt, params) = self.validate(request.get_ref())?;
        let head = prompt_head(&prompt, &params);
        let incoming = trace::incoming_traceparent(request.metadata());
        let (id, mut events) = self
            .engine
            .submit_traced(prompt, params, deadline, incoming)?;
        tracing::Span::current().record("request_id", id);
        tracing::debug!(request = id, "generate queued");
        let mut resp = pb::GenerateResponse::default();
        let mut ttft = None;
        while let Some(ev) = events.recv().await {
            match ev {
                EngineEvent::PromptLogprobs { logprobs, .. } => {
                    resp.prompt_logprobs = self.prompt_lps(&head, &logprobs);
                }
                EngineEvent::Token {
                    token,
                    text,
                    logprob,
                    ..
                } => {
                    ttft.get_or_insert_with(|| t0.elapsed());
                    obs.token();
                    resp.token_ids.push(token);
                    resp.text.push_str(&text);
                    if let Some(l) = logprob {
                        resp.logprobs.push(self.lp(&l));
                    }
                }
                EngineEvent::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                    cached_prompt_tokens,
                    text,
                    matched_stop,
                    ..
                } => {
                    resp.text.push_str(&text);
                    resp.finish_reason = finish_to_pb(reason) as i32;
                    resp.matched_stop = matched_stop;
                    resp.prompt_tokens = prompt_tokens as u32;
                    resp.completion_tokens = completion_tokens as u32;
                    resp.cached_prompt_tokens = cached_prompt_tokens as u32;
                    resp.time_to_first_token_ns = ttft.unwrap_or_default().as_nanos() as u64;
                    resp.total_time_ns = t0.elapsed().as_nanos() as u64;
                    obs.finished(prompt_tokens, completion_tokens);
                    record_finish(
                        prompt_tokens,
                        cached_prompt_tokens,
                        completion_tokens,
                        reason,
                    );
                    tracing::info!(
                        request = id,
                        prompt_tokens,
                        completion_tokens,
                        total_ms = t0.elapsed().as_millis() as u64,
                        "generate done"
                    );
                    return Ok(Response::new(resp));
                }
                EngineEvent::Failed { kind, message, .. } => {
                    return Err(status::from_failure(kind, &message));
                }
            }
        }
        Err(Status::internal(
            "the engine stopped before the request finished",
        ))
    }
}

impl InferenceApi {
    /// Generate, answered DEADLINE_EXCEEDED (and the engine request cancelled) at `deadline`
    /// less `unary_deadline_margin`. gRPC's Generate passes the client's deadline; the HTTP API,
    /// which no timeout layer wraps, the router's request timeout.
    pub async fn generate_until(
        &self,
        request: Request<pb::GenerateRequest>,
        deadline: Option<Instant>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let arrived = arrival(&request);
        let (span, mut obs) = self.begin(&request, "Generate");
        async move {
            let answer = {
                let work = self.generate_unary(request, deadline, &mut obs);
                match deadline {
                    // Dropping `work` drops the request's event receiver: the engine cancels it
                    // at the next step boundary and frees its cache.
                    Some(d) => {
                        let at = d - unary_deadline_margin(d, arrived);
                        tokio::time::timeout_at(tokio::time::Instant::from_std(at), work)
                            .await
                            .unwrap_or_else(|_| {
                                Err(Status::deadline_exceeded(
                                    "deadline exceeded before generation finished",
                                ))
                            })
                    }
                    None => work.await,
                }
            };
            if let Err(st) = &answer {
                obs.failed(st.code());
                tracing::Span::current().record("code", code_name(st.code()));
            }
            answer
        }
        .instrument(span)
        .await
    }
}

/// How much earlier than the client's deadline a unary Generate gives up. tonic's server
/// enforces `grpc-timeout` on unary calls itself and answers CANCELLED ("Timeout expired") at
/// the deadline; answering just before it makes the client see DEADLINE_EXCEEDED, the code gRPC
/// defines for this. Streams are not affected (tonic's timer stops at the response headers).
/// Both deadlines count from nearly the same instant (`limits::Arrival` is taken at the first
/// poll of the request's task, just after tonic started its timer); the margin covers that gap,
/// which a descheduled thread can stretch to milliseconds, and costs a request at most 20 ms
/// (a tenth of a short deadline) of its time.
fn unary_deadline_margin(deadline: Instant, arrived: Instant) -> Duration {
    let budget = deadline.saturating_duration_since(arrived);
    (budget / 10).min(Duration::from_millis(20))
}

#[tonic::async_trait]
impl Inference for InferenceApi {
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        // Only the client's deadline here: the router's own timeout for unary calls is
        // `limits::RequestTimeoutLayer` around this service. Giving the engine that timeout as
        // well would race the layer (whichever fires first decides the message); the layer
        // dropping this future cancels the engine request just the same.
        let deadline = self.client_deadline(&request);
        self.generate_until(request, deadline).await
    }

    type GenerateStreamStream = StreamOut;

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<StreamOut>, Status> {
        let t0 = Instant::now();
        // The request timeout layer stops timing when this returns (the response headers go
        // out), so the engine enforces the timeout on the stream itself.
        let deadline = self.stream_deadline(&request);
        let (span, mut obs) = self.begin(&request, "GenerateStream");
        let incoming = trace::incoming_traceparent(request.metadata());
        let submitted = span.in_scope(|| {
            let (prompt, params) = self.validate(request.get_ref())?;
            let head = prompt_head(&prompt, &params);
            let (id, events) = self
                .engine
                .submit_traced(prompt, params, deadline, incoming)?;
            tracing::Span::current().record("request_id", id);
            Ok::<_, Status>((head, id, events))
        });
        let (head, id, mut events) = match submitted {
            Ok(s) => s,
            Err(st) => {
                obs.failed(st.code());
                span.record("code", code_name(st.code()));
                return Err(st);
            }
        };
        let (tx, rx) = mpsc::channel(16);
        let me = self.0.clone();
        let task = async move {
            let mut ttft = None;
            while let Some(ev) = events.recv().await {
                let msg = match ev {
                    EngineEvent::PromptLogprobs { logprobs, .. } => {
                        Ok(pb::GenerateStreamResponse {
                            prompt_logprobs: me.prompt_lps(&head, &logprobs),
                            ..Default::default()
                        })
                    }
                    EngineEvent::Token {
                        token,
                        text,
                        logprob,
                        ..
                    } => {
                        ttft.get_or_insert_with(|| t0.elapsed());
                        obs.token();
                        Ok(pb::GenerateStreamResponse {
                            text,
                            token_ids: vec![token],
                            logprobs: logprob.iter().map(|l| me.lp(l)).collect(),
                            ..Default::default()
                        })
                    }
                    EngineEvent::Finished {
                        reason,
                        prompt_tokens,
                        completion_tokens,
                        cached_prompt_tokens,
                        text,
                        matched_stop,
                        ..
                    } => {
                        obs.finished(prompt_tokens, completion_tokens);
                        record_finish(
                            prompt_tokens,
                            cached_prompt_tokens,
                            completion_tokens,
                            reason,
                        );
                        Ok(pb::GenerateStreamResponse {
                            text,
                            summary: Some(pb::GenerateSummary {
                                finish_reason: finish_to_pb(reason) as i32,
                                matched_stop,
                                prompt_tokens: prompt_tokens as u32,
                                completion_tokens: completion_tokens as u32,
                                time_to_first_token_ns: ttft.unwrap_or_default().as_nanos() as u64,
                                total_time_ns: t0.elapsed().as_nanos() as u64,
                                cached_prompt_tokens: cached_prompt_tokens as u32,
                            }),
                            ..Default::default()
                        })
                    }
                    EngineEvent::Failed { kind, message, .. } => {
                        let st = status::from_failure(kind, &message);
                        obs.failed(st.code());
                        tracing::Span::current().record("code", code_name(st.code()));
                        Err(st)
                    }
                };
                let last = !matches!(&msg, Ok(m) if m.summary.is_none());
                if tx.send(msg).await.is_err() {
                    // The client went away: dropping `events` makes the engine cancel the request.
                    tracing::info!(request = id, "stream client disconnected");
                    return;
                }
                if last {
                    return;
                }
            }
        };
        tokio::spawn(task.instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let tok = self
            .tokenizer
            .clone()
            .ok_or_else(|| Status::failed_precondition("this model has no tokenizer"))?;
        let r = request.into_inner();
        // Tokenizing a long text takes milliseconds of CPU: off the async workers that serve
        // every other call.
        let (ids, tokens) = tokio::task::spawn_blocking(move || {
            let ids = if r.add_bos_token {
                tok.encode_prompt(&r.text)
            } else {
                tok.encode_raw(&r.text)
            }?;
            let tokens = ids.iter().map(|&i| tok.token_text(i)).collect::<Vec<_>>();
            Ok::<_, dsv2_core::error::CoreError>((ids, tokens))
        })
        .await
        .map_err(|e| Status::internal(format!("tokenizer task failed: {e}")))?
        .map_err(|e| status::from_core(&e))?;
        Ok(Response::new(pb::TokenizeResponse {
            token_ids: ids,
            tokens,
        }))
    }

    async fn model_info(
        &self,
        _request: Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let f = &self.facts;
        Ok(Response::new(pb::ModelInfoResponse {
            model_name: f.model_name.clone(),
            config_fingerprint: f.config_fingerprint.clone(),
            weights_fingerprint: f.weights_fingerprint.clone(),
            vocab_size: f.vocab_size,
            max_context_tokens: f.max_context_tokens,
            default_max_new_tokens: self.default_max_new_tokens,
            bos_token_id: f.bos_token_id,
            eos_token_ids: f.eos_token_ids.clone(),
            num_layers: f.num_layers,
            hidden_size: f.hidden_size,
            num_routed_experts: f.num_routed_experts,
            num_experts_per_token: f.num_experts_per_token,
            shard_endpoints: f.shard_endpoints.clone(),
            dtype: "f32 (weights in their stored dtype)".into(),
            device: f.device.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_parses_and_rejects_what_the_spec_rejects() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            parse_grpc_timeout("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        // A client-controlled header: more than 8 digits would overflow `n * 3600` or
        // `Instant::now() + d`, a panic on the request path.
        assert_eq!(parse_grpc_timeout("18446744073709551615H"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        for bad in ["", "S", "5", "5x", "-5S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn unary_deadline_margin_is_a_tenth_up_to_20_ms_and_never_passes_the_arrival() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(unary_deadline_margin(t0 + ms(500), t0), ms(20));
        assert_eq!(unary_deadline_margin(t0 + ms(60_000), t0), ms(20));
        assert_eq!(unary_deadline_margin(t0 + ms(50), t0), ms(5));
        // A deadline at or before the arrival (grpc-timeout 0): no margin, no underflow.
        assert_eq!(unary_deadline_margin(t0, t0 + ms(3)), Duration::ZERO);
    }
}
