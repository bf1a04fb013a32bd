//! The operators' graph: after some load on a real cluster (router + 2 expert shards, tiny model,
//! loopback), every histogram the router and the shards export has observations, the outcome
//! counters name the status codes, a shard counts a bad Forward as an error, and the Grafana
//! dashboard (deploy/grafana/dsv2-dashboard.json) queries only metrics the services export.

use std::collections::BTreeSet;
use std::path::Path;

use dsv2_core::placement::PlacementKind;
use dsv2_e2e::{
    Cluster, Extra, Sample, ids_request, metric_sum, parse_metrics, placement, post_json, scrape,
    text_request, tiny_model,
};
use dsv2_proto::expert::v1::ForwardRequest;
use dsv2_proto::expert::v1::expert_shard_client::ExpertShardClient;
use serde_json::{Value, json};

/// The router's histograms: each must have observations after the load below.
const ROUTER_HISTOGRAMS: &[&str] = &[
    "dsv2_router_time_to_first_token_seconds",
    "dsv2_router_time_per_output_token_seconds",
    "dsv2_router_request_duration_seconds",
    "dsv2_router_queue_wait_seconds",
    "dsv2_router_request_prompt_tokens",
    "dsv2_router_request_output_tokens",
    "dsv2_router_step_batch_sequences",
    "dsv2_router_step_batch_tokens",
    "dsv2_router_step_kv_cache_usage_ratio",
    "dsv2_router_step_duration_seconds",
];

/// The shards' histograms (rows and experts carry a `layer` label).
const EXPERT_HISTOGRAMS: &[&str] = &[
    "dsv2_expert_forward_duration_seconds",
    "dsv2_expert_forward_rows",
    "dsv2_expert_forward_experts",
];

fn histogram_count(samples: &[Sample], name: &str) -> f64 {
    let buckets: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == format!("{name}_bucket"))
        .collect();
    assert!(!buckets.is_empty(), "{name} has no buckets");
    for b in &buckets {
        assert!(b.labels.contains_key("le"), "{name} bucket without le");
    }
    metric_sum(samples, &format!("{name}_count"), &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_load_every_histogram_counts_on_router_and_shards() {
    let dir = tiny_model();
    let shards = placement(&dir, 2, PlacementKind::Groups);
    let cluster = Cluster::start_with(
        &dir,
        &shards,
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
        &Extra {
            expert_args: &["--metrics-listen", "127.0.0.1:0"],
            env: &[],
        },
    );

    // Load: concurrent gRPC Generate and GenerateStream calls with distinct prompts (so steps
    // batch several sequences), a request refused as INVALID_ARGUMENT, and HTTP completions.
    let mut tasks = Vec::new();
    for i in 0..6u32 {
        let mut c = cluster.client().await;
        tasks.push(tokio::spawn(async move {
            let ids: Vec<u32> = (0..10 + i).map(|t| 3 + (t * 7 + i) % 200).collect();
            let req = ids_request(&ids, 8);
            if i % 2 == 0 {
                dsv2_e2e::generate(&mut c, req).await
            } else {
                dsv2_e2e::generate_stream(&mut c, req).await
            }
        }));
    }
    for t in tasks {
        t.await.expect("task").expect("generation");
    }
    let mut c = cluster.client().await;
    let mut bad = text_request("x", 4);
    bad.temperature = Some(-1.0);
    let refused = c.generate(bad).await.expect_err("a negative temperature");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let http = cluster.router.http_addr.expect("--http-listen");
    let body = json!({"prompt": "The router", "max_tokens": 5, "temperature": 0});
    let (status, text) = post_json(http, "/v1/completions", &body, &[]).await;
    assert_eq!(status, 200, "{text}");

    // A Forward the shard must refuse: layer 0 is the dense layer of the tiny model.
    let mut shard = ExpertShardClient::new(dsv2_e2e::channel(&cluster.experts[0].url()).await);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(ForwardRequest {
        request_id: 1,
        layer: 0,
        num_rows: 1,
        hidden_size: 1,
        hidden: vec![0; 2],
        experts_per_row: 1,
        expert_ids: vec![0],
        gate_weights: vec![1.0],
        ..Default::default()
    })
    .await
    .expect("queue the bad request");
    let mut answers = shard
        .forward(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("Forward stream")
        .into_inner();
    let answer = answers
        .message()
        .await
        .expect("an answer")
        .expect("a message");
    assert!(answer.error.is_some(), "{answer:?}");
    drop((tx, answers));
    // The shard notices the end of this test's stream on its own time: wait for it, so only the
    // router's stream is open below.
    let t0 = std::time::Instant::now();
    while metric_sum(
        &parse_metrics(&scrape(&cluster.experts[0])),
        "dsv2_expert_forward_streams",
        &[],
    ) != 1.0
    {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "shard 0 still counts the test's Forward stream"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // The engine publishes after each step, the handlers as they answer: all done by now.
    let router = parse_metrics(&scrape(&cluster.router));
    for name in ROUTER_HISTOGRAMS {
        let n = histogram_count(&router, name);
        assert!(n > 0.0, "{name} has no observations");
    }
    // 6 gRPC + 1 HTTP requests finished; each has a time to first token.
    assert!(histogram_count(&router, "dsv2_router_time_to_first_token_seconds") >= 7.0);
    let requests = "dsv2_router_requests_total";
    assert_eq!(
        metric_sum(&router, requests, &[("api", "grpc"), ("code", "OK")]),
        6.0
    );
    assert_eq!(
        metric_sum(&router, requests, &[("api", "http"), ("code", "OK")]),
        1.0
    );
    assert_eq!(
        metric_sum(
            &router,
            requests,
            &[("api", "grpc"), ("code", "INVALID_ARGUMENT")]
        ),
        1.0
    );
    // the cache's memory: its blocks x the bytes of a block of every layer (f32 on the CPU)
    let cfg = dsv2_core::ModelConfig::from_model_dir(&dir).expect("reading the model config");
    let block =
        dsv2_core::backend::Backend::host_block_bytes(&dsv2_core::cpu::CpuBackend, &cfg, 16);
    assert_eq!(
        metric_sum(&router, "dsv2_router_kv_cache_bytes", &[]),
        metric_sum(&router, "dsv2_router_kv_cache_blocks", &[]) * block as f64
    );
    let ratio_sum = metric_sum(&router, "dsv2_router_step_kv_cache_usage_ratio_sum", &[]);
    let ratio_n = histogram_count(&router, "dsv2_router_step_kv_cache_usage_ratio");
    assert!(
        ratio_sum > 0.0 && ratio_sum <= ratio_n,
        "KV cache use is a fraction"
    );

    let mut expert_samples = Vec::new();
    for (i, e) in cluster.experts.iter().enumerate() {
        let s = parse_metrics(&scrape(e));
        for name in EXPERT_HISTOGRAMS {
            let n = histogram_count(&s, name);
            assert!(n > 0.0, "shard {i}: {name} has no observations");
        }
        // Rows and experts per layer: only MoE layers (the tiny model's layer 0 is dense).
        assert!(
            s.iter()
                .filter(|x| x.name == "dsv2_expert_forward_rows_count")
                .all(|x| x.labels.get("layer").is_some_and(|l| l != "0"))
        );
        assert_eq!(
            metric_sum(&s, "dsv2_expert_forward_streams", &[]),
            1.0,
            "shard {i}: the router's Forward stream"
        );
        expert_samples.push(s);
    }
    assert_eq!(
        metric_sum(
            &expert_samples[0],
            "dsv2_expert_forward_errors_total",
            &[("code", "invalid_argument")]
        ),
        1.0
    );

    // The dashboard queries only what the services export.
    let exported: BTreeSet<String> = router
        .iter()
        .chain(expert_samples.iter().flatten())
        .map(|s| s.name.clone())
        .collect();
    let used = dashboard_metrics();
    assert!(!used.is_empty());
    let missing: Vec<&String> = used.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics no service exports: {missing:?}"
    );
    // And it graphs every histogram above.
    for h in ROUTER_HISTOGRAMS.iter().chain(EXPERT_HISTOGRAMS) {
        assert!(
            used.iter().any(|m| m.starts_with(h)),
            "the dashboard does not graph {h}"
        );
    }
}

/// Every `dsv2_*` metric name in the dashboard's query expressions; each expression must name at
/// least one.
fn dashboard_metrics() -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/dsv2-dashboard.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dash, &mut exprs);
    assert!(exprs.len() >= 10, "only {} queries", exprs.len());
    let mut names = BTreeSet::new();
    for e in &exprs {
        let found = metric_names(e);
        assert!(!found.is_empty(), "a query names no dsv2 metric: {e}");
        names.extend(found);
    }
    names
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}

/// The `dsv2_...` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("dsv2_") {
        let start = i + at;
        let boundary =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if boundary {
            out.push(expr[start..end].to_string());
        }
        i = end;
    }
    out
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.9, sum by (le) (rate(dsv2_router_queue_wait_seconds_bucket[5m])))"
        ),
        vec!["dsv2_router_queue_wait_seconds_bucket"]
    );
    assert_eq!(
        metric_names("a_dsv2_x + dsv2_y{code=\"OK\"}"),
        vec!["dsv2_y"]
    );
}
