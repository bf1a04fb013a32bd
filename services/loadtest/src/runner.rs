//! Drives `dsv2.v1.Inference` with C concurrent workers over one HTTP/2 connection until N
//! requests are done, the duration is up, or the caller cancels; records one result per request.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use dsv2_proto::inference::v1::inference_client::InferenceClient;
use dsv2_security::client::AuthChannel;
use tokio::sync::watch;
use tonic::{Code, Status};

use crate::LoadtestError;

type Client = InferenceClient<AuthChannel>;
use crate::config::{CallKind, LoadtestConfig, RequestData};
use crate::report::{CallResult, DecodeSpan, EndReason, Report, ReportOptions, TtftSource};

/// Runs the load test described by `cfg` to completion.
pub async fn run(cfg: LoadtestConfig) -> Result<Report, LoadtestError> {
    run_until(cfg, std::future::pending()).await
}

/// Like [`run`], but stops early when `cancel` completes (e.g. on Ctrl-C): no new requests
/// start, requests in flight are dropped, and the report covers what had finished, with end
/// reason `cancel`.
pub async fn run_until(
    cfg: LoadtestConfig,
    cancel: impl Future<Output = ()>,
) -> Result<Report, LoadtestError> {
    cfg.validate()?;
    let endpoint = cfg
        .security
        .endpoint(&cfg.endpoint)?
        .connect_timeout(cfg.connect_timeout);
    let bearer = cfg.security.bearer()?;
    // ghz fails fast when it cannot connect, rather than reporting N Unavailable requests.
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| LoadtestError::Connect {
            endpoint: cfg.endpoint.clone(),
            source,
        })?;

    let start = Instant::now();
    let shared = Arc::new(Shared {
        next: AtomicU64::new(0),
        total: cfg.total,
        deadline: cfg.duration.map(|d| start + d),
        data: cfg.data.clone(),
        call: cfg.call,
        timeout: cfg.timeout,
    });

    // Cancellation: workers see the flag before each request; the select below drops them.
    let (stop_tx, stop_rx) = watch::channel(false);
    let workers: Vec<_> = (0..cfg.concurrency)
        .map(|_| {
            let client = InferenceClient::with_interceptor(channel.clone(), bearer.clone());
            tokio::spawn(worker(client, Arc::clone(&shared), stop_rx.clone()))
        })
        .collect();

    let mut details = Vec::new();
    let mut end_reason = EndReason::Normal;
    let collect = async {
        let mut all = Vec::new();
        for w in workers {
            match w.await {
                Ok(results) => all.push(results),
                Err(e) => return Err(LoadtestError::Worker(e.to_string())),
            }
        }
        Ok(all)
    };
    tokio::pin!(collect);
    tokio::pin!(cancel);
    tokio::select! {
        res = &mut collect => {
            for r in res? {
                details.extend(r);
            }
        }
        () = &mut cancel => {
            end_reason = EndReason::Cancel;
            let _ = stop_tx.send(true);
        }
    }
    if end_reason == EndReason::Cancel {
        // Workers stop at their next await on the stop flag; collect what they finished.
        for r in collect.await? {
            details.extend(r);
        }
    } else if shared.deadline.is_some_and(|d| Instant::now() >= d)
        && (cfg.total == 0 || shared.next.load(Ordering::Relaxed) < cfg.total)
    {
        end_reason = EndReason::Timeout;
    }
    let total = start.elapsed();

    let ttft_source = match cfg.call {
        CallKind::Generate => TtftSource::ServerReported,
        CallKind::Stream => TtftSource::ClientMeasured,
    };
    let options = ReportOptions {
        host: cfg.endpoint.clone(),
        call: cfg.call.method().to_string(),
        insecure: true,
        total: cfg.total,
        concurrency: cfg.concurrency as u64,
        duration: cfg.duration,
        timeout: cfg.timeout,
        dial_timeout: cfg.connect_timeout,
        data: cfg.data.json().clone(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
        name: cfg.name.clone(),
    };
    Ok(Report::from_results(
        options,
        end_reason,
        total,
        ttft_source,
        details,
    ))
}

/// State every worker reads.
struct Shared {
    /// Next request number to claim.
    next: AtomicU64,
    /// Request limit (0: none).
    total: u64,
    /// No request starts after this instant.
    deadline: Option<Instant>,
    data: RequestData,
    call: CallKind,
    timeout: Duration,
}

impl Shared {
    /// Claims the next request number, or None when the run is over.
    fn claim(&self) -> Option<u64> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        (self.total == 0 || n < self.total).then_some(n)
    }
}

async fn worker(
    mut client: Client,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Vec<CallResult> {
    let mut results = Vec::new();
    while let Some(n) = shared.claim() {
        if *stop.borrow() {
            break;
        }
        let call = one_call(&mut client, &shared, n);
        tokio::select! {
            r = call => results.push(r),
            // Cancelled mid-request: the request is dropped (its stream reset), not recorded.
            _ = stop.changed() => break,
        }
    }
    results
}

/// Sends request `n` and records its outcome; never fails (failures are results).
async fn one_call(client: &mut Client, shared: &Shared, n: u64) -> CallResult {
    let timestamp = SystemTime::now();
    let start = Instant::now();
    let mut request = tonic::Request::new(shared.data.for_request(n));
    // The client's own timer decides the deadline (DeadlineExceeded, as ghz reports it); the
    // server is told a little more so its own expiry (tonic answers Cancelled "Timeout
    // expired") does not race the client's, yet it still frees the request soon after.
    request.set_timeout(shared.timeout + (shared.timeout / 10).max(Duration::from_millis(10)));
    let outcome = tokio::time::timeout(shared.timeout, async {
        match shared.call {
            CallKind::Generate => unary(client, request).await,
            CallKind::Stream => stream(client, request, start).await,
        }
    })
    .await
    .unwrap_or_else(|_| Err(Status::deadline_exceeded("context deadline exceeded")));
    let latency = start.elapsed();
    match outcome {
        Ok(ok) => CallResult {
            timestamp,
            latency,
            status: "OK".to_string(),
            error: None,
            completion_tokens: ok.completion_tokens,
            time_to_first_token: ok.time_to_first_token,
            missing_summary: ok.missing_summary,
            decode: ok.decode,
        },
        Err(status) => CallResult {
            timestamp,
            latency,
            status: go_code_name(status.code()).to_string(),
            error: Some(format!(
                "rpc error: code = {} desc = {}",
                go_code_name(status.code()),
                status.message()
            )),
            completion_tokens: 0,
            time_to_first_token: None,
            missing_summary: false,
            decode: None,
        },
    }
}

/// What a successful call reports.
struct CallOk {
    completion_tokens: u64,
    time_to_first_token: Option<Duration>,
    missing_summary: bool,
    decode: Option<DecodeSpan>,
}

async fn unary(
    client: &mut Client,
    request: tonic::Request<dsv2_proto::inference::v1::GenerateRequest>,
) -> Result<CallOk, Status> {
    let resp = client.generate(request).await?.into_inner();
    Ok(CallOk {
        completion_tokens: u64::from(resp.completion_tokens),
        // A server that generated nothing has no first token to report.
        time_to_first_token: (resp.completion_tokens > 0)
            .then(|| Duration::from_nanos(resp.time_to_first_token_ns)),
        missing_summary: false,
        decode: None,
    })
}

async fn stream(
    client: &mut Client,
    request: tonic::Request<dsv2_proto::inference::v1::GenerateRequest>,
    start: Instant,
) -> Result<CallOk, Status> {
    let mut stream = client.generate_stream(request).await?.into_inner();
    let mut first_token: Option<Duration> = None;
    let mut delta_tokens = 0u64;
    let mut summary_tokens: Option<u64> = None;
    let mut tracker = DecodeTracker::default();
    while let Some(msg) = stream.message().await? {
        if !msg.token_ids.is_empty() {
            let at = start.elapsed();
            first_token.get_or_insert(at);
            delta_tokens += msg.token_ids.len() as u64;
            tracker.tokens(msg.token_ids.len() as u64, at);
        }
        if let Some(s) = msg.summary {
            summary_tokens = Some(u64::from(s.completion_tokens));
        }
    }
    Ok(CallOk {
        // The server's count is authoritative; the deltas stand in when it never came.
        completion_tokens: summary_tokens.unwrap_or(delta_tokens),
        time_to_first_token: first_token,
        missing_summary: summary_tokens.is_none(),
        decode: tracker.span(),
    })
}

/// The decode phase of a stream from its token messages' arrival times: the tokens after the
/// first message's, between the first and the last message (the prefill, which makes the first
/// token, is not decode).
#[derive(Debug, Default)]
struct DecodeTracker {
    first: Option<Duration>,
    last: Duration,
    tokens_after_first: u64,
}

impl DecodeTracker {
    fn tokens(&mut self, n: u64, at: Duration) {
        if self.first.is_none() {
            self.first = Some(at);
        } else {
            self.tokens_after_first += n;
        }
        self.last = at;
    }

    fn span(&self) -> Option<DecodeSpan> {
        let first = self.first?;
        (self.tokens_after_first > 0).then(|| DecodeSpan {
            tokens: self.tokens_after_first,
            time: self.last.saturating_sub(first),
        })
    }
}

/// gRPC status names as grpc-go spells them (`codes.Code.String()`), which is what ghz prints.
pub fn go_code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_span_starts_at_the_first_token_message() {
        let ms = Duration::from_millis;
        let mut t = DecodeTracker::default();
        assert_eq!(t.span(), None);
        t.tokens(1, ms(40));
        // one token message: no decode phase to speak of
        assert_eq!(t.span(), None);
        t.tokens(1, ms(42));
        t.tokens(2, ms(46));
        assert_eq!(
            t.span(),
            Some(DecodeSpan {
                tokens: 3,
                time: ms(6)
            })
        );
    }
}
