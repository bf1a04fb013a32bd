//! Traces across services: router and two expert shards export over OTLP to a collector in this
//! process (a tonic server of the OTLP TraceService). A request sent with a W3C `traceparent`,
//! over gRPC metadata or the HTTP header, produces router spans (generate, validate, queue,
//! prefill, decode) and shard `forward` spans, all in the client's trace: the router's request
//! span is the client span's child, and each shard span the child of a router span.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dsv2_core::placement::PlacementKind;
use dsv2_e2e::{Cluster, Extra, ids_request, placement, post_json, tiny_model};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use serde_json::json;

/// One exported span, as the test needs it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Got>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    AnyValue::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Got {
                        service: service.clone(),
                        name: s.name,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                    });
                }
            }
        }
        self.spans.lock().expect("spans").extend(got);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Starts the collector on a free loopback port; returns its URL.
async fn start_collector(c: Collector) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding the collector");
    let addr = listener.local_addr().expect("collector address");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(c))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    format!("http://{addr}")
}

const TRACE_GRPC: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACE_HTTP: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// The router and shard spans of `trace`, once the shards' spans have arrived.
fn spans_of(c: &Collector, trace: &str) -> Vec<Got> {
    c.spans
        .lock()
        .expect("spans")
        .iter()
        .filter(|s| s.trace_id == trace)
        .cloned()
        .collect()
}

fn check_trace(spans: &[Got], trace: &str) {
    let router: Vec<&Got> = spans
        .iter()
        .filter(|s| s.service == "dsv2-router")
        .collect();
    let shard: Vec<&Got> = spans
        .iter()
        .filter(|s| s.service == "dsv2-expert")
        .collect();
    let names: BTreeSet<&str> = router.iter().map(|s| s.name.as_str()).collect();
    for want in ["generate", "validate", "queue", "prefill", "decode"] {
        assert!(
            names.contains(want),
            "trace {trace}: no router span {want:?} in {names:?}"
        );
    }
    // One span per phase, not per step.
    for phase in ["queue", "prefill", "decode"] {
        assert_eq!(
            router.iter().filter(|s| s.name == phase).count(),
            1,
            "trace {trace}: {phase}"
        );
    }
    let by_id: BTreeMap<&str, &Got> = router.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    let generate = router
        .iter()
        .find(|s| s.name == "generate")
        .expect("generate");
    assert_eq!(
        generate.parent_span_id, CLIENT_SPAN,
        "the request span is the client span's child"
    );
    for s in &router {
        if s.name != "generate" {
            assert_eq!(
                s.parent_span_id, generate.span_id,
                "{} under the request span",
                s.name
            );
        }
    }
    assert!(
        !shard.is_empty(),
        "trace {trace}: no shard spans (router spans: {names:?})"
    );
    for s in &shard {
        assert_eq!(s.name, "forward");
        let parent = by_id.get(s.parent_span_id.as_str()).unwrap_or_else(|| {
            panic!("shard span's parent {} is no router span", s.parent_span_id)
        });
        assert!(
            parent.name == "prefill" || parent.name == "decode",
            "shard span under {}",
            parent.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_reaches_router_and_shard_spans_over_grpc_and_http() {
    let collector = Collector::default();
    let url = start_collector(collector.clone()).await;
    let dir = tiny_model();
    let shards = placement(&dir, 2, PlacementKind::Groups);
    let args = ["--otlp-endpoint", url.as_str()];
    let mut router_args = args.to_vec();
    router_args.extend(["--http-listen", "127.0.0.1:0"]);
    let cluster = Cluster::start_with(
        &dir,
        &shards,
        &router_args,
        &Extra {
            expert_args: &args,
            // Export every 100 ms instead of every 5 s.
            env: &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
        },
    );

    // gRPC: traceparent in the metadata.
    let mut c = cluster.client().await;
    let mut req = tonic::Request::new(ids_request(&[3, 14, 15, 92, 65], 4));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_GRPC}-{CLIENT_SPAN}-01")
            .parse()
            .expect("ASCII"),
    );
    let r = c.generate(req).await.expect("Generate").into_inner();
    assert_eq!(r.completion_tokens, 4);

    // HTTP: the traceparent header.
    let http = cluster.router.http_addr.expect("--http-listen");
    let body =
        json!({"prompt": "The router", "max_tokens": 4, "temperature": 0, "ignore_eos": true});
    let tp = format!("00-{TRACE_HTTP}-{CLIENT_SPAN}-01");
    let (status, text) = post_json(http, "/v1/completions", &body, &[("traceparent", &tp)]).await;
    assert_eq!(status, 200, "{text}");

    // Spans arrive in batches; wait until each trace has its router phases and shard spans.
    let t0 = Instant::now();
    loop {
        let ready = [TRACE_GRPC, TRACE_HTTP].iter().all(|t| {
            let s = spans_of(&collector, t);
            s.iter().any(|x| x.service == "dsv2-expert")
                && s.iter().any(|x| x.name == "decode")
                && s.iter().any(|x| x.name == "generate")
        });
        if ready {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "spans did not arrive: {:#?}",
            collector.spans.lock().expect("spans")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A last batch may still be on its way: give it a moment, then check everything.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for t in [TRACE_GRPC, TRACE_HTTP] {
        check_trace(&spans_of(&collector, t), t);
    }
    // Both shards served layers of these requests, each in the client's trace.
    let shard_traces: BTreeSet<String> = collector
        .spans
        .lock()
        .expect("spans")
        .iter()
        .filter(|s| s.service == "dsv2-expert")
        .map(|s| s.trace_id.clone())
        .collect();
    assert!(shard_traces.contains(TRACE_GRPC) && shard_traces.contains(TRACE_HTTP));
}
