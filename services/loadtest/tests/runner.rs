//! Runs the load generator against a small in-process `dsv2.v1.Inference` test server on a
//! loopback port. The server is a test fixture for the *client* side (counting, statuses,
//! timeouts, streams, cancellation); the end-to-end run against the real router is the lead's
//! tests/ suite. The server's behaviour is chosen by the prompt text:
//! "fail" -> UNAVAILABLE, "slow" -> sleeps 10 s, "nosummary" -> a stream without its summary,
//! anything else -> max_new_tokens tokens (one per stream message) after a short sleep.

use std::pin::Pin;
use std::time::Duration;

use dsv2_loadtest::{CallKind, EndReason, LoadtestConfig, LoadtestError, RequestData, TtftSource};
use dsv2_proto::inference::v1::{
    GenerateRequest, GenerateResponse, GenerateStreamResponse, GenerateSummary, ModelInfoRequest,
    ModelInfoResponse, TokenizeRequest, TokenizeResponse,
    generate_request::Prompt,
    inference_server::{Inference, InferenceServer},
};
use tokio_stream::{Stream, wrappers::TcpListenerStream};
use tonic::{Request, Response, Status};

/// Server-reported time to first token of every unary response.
const TTFT_NS: u64 = 1_000_000;

struct TestServer;

fn prompt_text(r: &GenerateRequest) -> &str {
    match &r.prompt {
        Some(Prompt::Text(t)) => t,
        _ => "",
    }
}

#[tonic::async_trait]
impl Inference for TestServer {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let r = request.into_inner();
        match prompt_text(&r) {
            "fail" => return Err(Status::unavailable("test server: down")),
            "slow" => tokio::time::sleep(Duration::from_secs(10)).await,
            _ => tokio::time::sleep(Duration::from_millis(2)).await,
        }
        let n = r.max_new_tokens.unwrap_or(4);
        Ok(Response::new(GenerateResponse {
            text: "x".repeat(n as usize),
            token_ids: (0..n).collect(),
            completion_tokens: n,
            prompt_tokens: 1,
            time_to_first_token_ns: TTFT_NS,
            total_time_ns: 2 * TTFT_NS,
            ..Default::default()
        }))
    }

    type GenerateStreamStream =
        Pin<Box<dyn Stream<Item = Result<GenerateStreamResponse, Status>> + Send + 'static>>;

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let r = request.into_inner();
        let n = r.max_new_tokens.unwrap_or(4);
        let with_summary = prompt_text(&r) != "nosummary";
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for i in 0..n {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let msg = GenerateStreamResponse {
                    text: "x".into(),
                    token_ids: vec![i],
                    ..Default::default()
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
            if with_summary {
                let summary = GenerateSummary {
                    completion_tokens: n,
                    prompt_tokens: 1,
                    ..Default::default()
                };
                let last = GenerateStreamResponse {
                    summary: Some(summary),
                    ..Default::default()
                };
                let _ = tx.send(Ok(last)).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn tokenize(
        &self,
        _request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        Err(Status::unimplemented("not used by the load generator"))
    }

    async fn model_info(
        &self,
        _request: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        Err(Status::unimplemented("not used by the load generator"))
    }
}

/// Starts the test server on an ephemeral loopback port; returns its URL.
async fn start_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(InferenceServer::new(TestServer))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .expect("test server");
    });
    format!("http://{addr}")
}

fn config(endpoint: &str, call: CallKind, data: &str) -> LoadtestConfig {
    let data = RequestData::from_json_str(data).expect("data");
    let mut c = LoadtestConfig::new(endpoint, call, data);
    c.timeout = Duration::from_secs(5);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_counts_statuses_and_server_ttft() {
    let url = start_server().await;
    let mut c = config(
        &url,
        CallKind::Generate,
        r#"[{"text": "ok", "max_new_tokens": 8}, {"text": "fail"}]"#,
    );
    c.concurrency = 4;
    c.total = 40;
    let r = dsv2_loadtest::run(c).await.expect("run");
    assert_eq!(r.end_reason, EndReason::Normal);
    assert_eq!(r.count, 40);
    assert_eq!(r.ok_count, 20, "data is used round-robin");
    assert_eq!(r.error_count, 20);
    assert_eq!(r.status_code_distribution.get("OK"), Some(&20));
    assert_eq!(r.status_code_distribution.get("Unavailable"), Some(&20));
    assert_eq!(
        r.error_distribution
            .get("rpc error: code = Unavailable desc = test server: down"),
        Some(&20)
    );
    assert_eq!(r.completion_tokens, 20 * 8);
    assert_eq!(r.histogram.iter().map(|b| b.count).sum::<u64>(), 20);
    assert!(r.fastest >= Duration::from_millis(2), "server sleeps 2 ms");
    let t = r.time_to_first_token.expect("ttft");
    assert_eq!(t.source, TtftSource::ServerReported);
    assert_eq!(t.p50, Duration::from_nanos(TTFT_NS));
    assert_eq!(t.samples, 20);
    let text = r.to_string();
    // Visible with --nocapture: what the lead's `dsv2 loadtest` will print.
    println!("{text}");
    assert!(text.contains("  [OK]            20 responses"), "{text}");
    let json = r.to_ghz_json();
    assert_eq!(json["count"], 40);
    assert_eq!(json["options"]["call"], "dsv2.v1.Inference/Generate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_counts_tokens_and_client_ttft() {
    let url = start_server().await;
    let mut c = config(
        &url,
        CallKind::Stream,
        r#"{"text": "ok", "maxNewTokens": 5}"#,
    );
    c.concurrency = 3;
    c.total = 12;
    let r = dsv2_loadtest::run(c).await.expect("run");
    assert_eq!((r.count, r.ok_count, r.error_count), (12, 12, 0));
    assert_eq!(r.completion_tokens, 60);
    assert_eq!(r.streams_without_summary, 0);
    let t = r.time_to_first_token.expect("ttft");
    assert_eq!(t.source, TtftSource::ClientMeasured);
    assert_eq!(t.samples, 12);
    assert!(
        t.p99 <= r.slowest,
        "first token comes before the end of the stream"
    );
    assert!(
        t.p50 >= Duration::from_millis(1),
        "server sleeps 1 ms before each token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_without_summary_is_flagged() {
    let url = start_server().await;
    let mut c = config(
        &url,
        CallKind::Stream,
        r#"{"text": "nosummary", "max_new_tokens": 3}"#,
    );
    c.concurrency = 2;
    c.total = 4;
    let r = dsv2_loadtest::run(c).await.expect("run");
    assert_eq!(r.ok_count, 4);
    assert_eq!(r.streams_without_summary, 4);
    assert_eq!(r.completion_tokens, 12, "counted from the deltas");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_request_timeout_is_deadline_exceeded() {
    let url = start_server().await;
    let mut c = config(&url, CallKind::Generate, r#"{"text": "slow"}"#);
    c.concurrency = 3;
    c.total = 3;
    c.timeout = Duration::from_millis(100);
    let r = dsv2_loadtest::run(c).await.expect("run");
    assert_eq!(r.count, 3);
    assert_eq!(
        r.status_code_distribution.get("DeadlineExceeded"),
        Some(&3),
        "{r}"
    );
    assert!(r.histogram.is_empty());
    assert!(
        r.total < Duration::from_secs(5),
        "timeouts bound the run: {:?}",
        r.total
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_limit_ends_the_run() {
    let url = start_server().await;
    let mut c = config(
        &url,
        CallKind::Generate,
        r#"{"text": "ok", "max_new_tokens": 1}"#,
    );
    c.concurrency = 2;
    c.total = 0;
    c.duration = Some(Duration::from_millis(300));
    let r = dsv2_loadtest::run(c).await.expect("run");
    assert_eq!(r.end_reason, EndReason::Timeout);
    assert!(r.count > 0);
    assert_eq!(r.count, r.ok_count + r.error_count);
    assert!(r.total >= Duration::from_millis(300));
    assert!(r.total < Duration::from_secs(3), "{:?}", r.total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_in_flight_requests() {
    let url = start_server().await;
    let c = config(&url, CallKind::Generate, r#"{"text": "slow"}"#);
    let r = dsv2_loadtest::run_until(c, tokio::time::sleep(Duration::from_millis(200)))
        .await
        .expect("run");
    assert_eq!(r.end_reason, EndReason::Cancel);
    assert_eq!(r.count, 0, "in-flight requests are dropped, not recorded");
    assert!(r.total < Duration::from_secs(3), "{:?}", r.total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_is_a_connect_error() {
    // Bind then drop a listener so the port is (almost certainly) closed.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut c = config(
        &format!("http://127.0.0.1:{port}"),
        CallKind::Generate,
        r#"{"text": "ok"}"#,
    );
    c.connect_timeout = Duration::from_secs(2);
    let err = dsv2_loadtest::run(c).await.expect_err("nothing listens");
    assert!(matches!(err, LoadtestError::Connect { .. }), "{err}");
}
