//! Operations over real processes: a lost shard gives UNAVAILABLE and a restarted one restores
//! service without restarting the router; health and reflection answer on both binaries;
//! `dsv2_loadtest` against a tiny cluster adds up; SIGTERM drains in-flight requests.

use std::time::{Duration, Instant};

use dsv2_e2e::{
    Cluster, channel, fixture, generate, generate_stream, ids_request, start_expert, tiny_model,
};
use dsv2_loadtest::{CallKind, LoadtestConfig, RequestData};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_shard_gives_unavailable_and_restart_restores_service() {
    let c = Cluster::two_shards(&fixture("v2"), &["--shard-timeout-s", "20"]);
    let mut client = c.client().await;
    let req = ids_request(&[40, 41, 42, 43], 8);
    let before = generate(&mut client, req.clone()).await.expect("serving");

    let mut c = c;
    let port = c.experts[1].addr.port();
    let experts_1 =
        dsv2_e2e::placement(&c.model_dir, 2, dsv2_core::placement::PlacementKind::Groups)[1]
            .clone();
    // A request in flight when the shard dies fails UNAVAILABLE instead of hanging.
    let mut in_flight = client
        .generate_stream(ids_request(&[44, 45, 46], 2000))
        .await
        .expect("long stream")
        .into_inner();
    in_flight
        .message()
        .await
        .expect("first token")
        .expect("stream open");
    c.experts[1].kill();
    let t0 = Instant::now();
    let err = loop {
        match in_flight.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended normally although a shard died under it"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "in-flight request failed only after {:?}",
        t0.elapsed()
    );
    eprintln!(
        "in-flight stream: UNAVAILABLE after {:?}: {}",
        t0.elapsed(),
        err.message()
    );

    // Every request that needs the dead shard fails UNAVAILABLE, promptly, unary or streamed.
    for streamed in [false, true] {
        let t0 = Instant::now();
        let r = if streamed {
            generate_stream(&mut client, req.clone()).await
        } else {
            generate(&mut client, req.clone()).await
        };
        let e = r.expect_err("a request succeeded with a shard down");
        assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
        eprintln!(
            "shard down, {}: UNAVAILABLE after {:?}: {}",
            if streamed { "stream" } else { "unary" },
            t0.elapsed(),
            e.message()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "UNAVAILABLE took {:?}",
            t0.elapsed()
        );
    }
    // The router is still up and healthy.
    let info = client
        .model_info(dsv2_proto::inference::v1::ModelInfoRequest {})
        .await
        .expect("ModelInfo while a shard is down")
        .into_inner();
    assert_eq!(info.shard_endpoints.len(), 2);

    // Same address, new process: the router reconnects on its own.
    let listen = format!("127.0.0.1:{port}");
    c.experts[1] = start_expert("expert-1 (restarted)", &c.model_dir, &experts_1, &listen);
    let t0 = Instant::now();
    let mut failed_attempts = 0;
    let after = loop {
        match generate(&mut client, req.clone()).await {
            Ok(o) => break o,
            Err(e) if e.code() == Code::Unavailable && t0.elapsed() < Duration::from_secs(15) => {
                failed_attempts += 1;
                eprintln!("after restart: {}", e.message());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("service not restored after the shard restarted: {e}"),
        }
    };
    eprintln!(
        "service restored {:?} after the restart, {failed_attempts} failed attempts",
        t0.elapsed()
    );
    assert_eq!(after, before, "output changed after the shard restarted");
    let streamed = generate_stream(&mut client, req)
        .await
        .expect("stream after restart");
    assert_eq!(streamed.token_ids, before.token_ids);
}

async fn health(url: &str, service: &str) -> Result<HealthCheckResponse, tonic::Status> {
    let mut h = HealthClient::new(channel(url).await);
    h.check(HealthCheckRequest {
        service: service.into(),
    })
    .await
    .map(|r| r.into_inner())
}

async fn list_services(url: &str) -> Vec<String> {
    let mut r = ServerReflectionClient::new(channel(url).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = r
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("ServerReflectionInfo")
        .into_inner();
    let msg = resp
        .message()
        .await
        .expect("reflection answer")
        .expect("one answer");
    match msg.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer_on_router_and_expert() {
    let c = Cluster::two_shards(&fixture("v2"), &[]);
    let router = c.endpoint();
    for svc in ["", "dsv2.v1.Inference"] {
        let r = health(&router, svc).await.expect("router health");
        assert_eq!(r.status, ServingStatus::Serving as i32, "router {svc:?}");
    }
    let e = health(&router, "no.such.Service")
        .await
        .expect_err("unknown service reported healthy");
    assert_eq!(e.code(), Code::NotFound);
    let services = list_services(&router).await;
    for want in [
        "dsv2.v1.Inference",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            services.iter().any(|s| s == want),
            "router reflection lacks {want}: {services:?}"
        );
    }
    let expert = c.experts[0].url();
    for svc in ["", "dsv2.expert.v1.ExpertShard"] {
        let r = health(&expert, svc).await.expect("expert health");
        assert_eq!(r.status, ServingStatus::Serving as i32, "expert {svc:?}");
    }
    let services = list_services(&expert).await;
    for want in ["dsv2.expert.v1.ExpertShard", "grpc.health.v1.Health"] {
        assert!(
            services.iter().any(|s| s == want),
            "expert reflection lacks {want}: {services:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_against_a_tiny_cluster_adds_up() {
    let c = Cluster::two_shards(&tiny_model(), &[]);
    for call in [CallKind::Generate, CallKind::Stream] {
        let data = RequestData::from_json_str(
            r#"[{"text": "The router receives a request", "max_new_tokens": 6, "temperature": 0, "ignore_eos": true},
                {"token_ids": {"ids": [0, 17, 42]}, "max_new_tokens": 4, "ignore_eos": true}]"#,
        )
        .expect("request data");
        let mut cfg = LoadtestConfig::new(c.endpoint(), call, data);
        cfg.concurrency = 4;
        cfg.total = 12;
        cfg.timeout = Duration::from_secs(60);
        let report = dsv2_loadtest::run(cfg).await.expect("load test ran");
        let summary = format!("{report}");
        assert_eq!(report.count, 12, "{summary}");
        assert_eq!(
            report.count,
            report.ok_count + report.error_count,
            "{summary}"
        );
        assert_eq!(report.error_count, 0, "{summary}");
        assert_eq!(report.details.len(), 12);
        assert_eq!(
            report.status_code_distribution.get("OK").copied(),
            Some(12),
            "{summary}"
        );
        // 6 tokens for the even requests, 4 for the odd ones.
        assert_eq!(report.completion_tokens, 6 * 6 + 6 * 4, "{summary}");
        let lat: Vec<Duration> = report
            .latency_distribution
            .iter()
            .map(|p| p.latency)
            .collect();
        assert!(!lat.is_empty());
        assert!(lat.windows(2).all(|w| w[0] <= w[1]), "{summary}");
        assert!(report.fastest <= report.average && report.average <= report.slowest);
        assert!(lat[0] >= report.fastest && lat[lat.len() - 1] <= report.slowest);
        assert!(report.tokens_per_sec > 0.0 && report.rps > 0.0, "{summary}");
        if call == CallKind::Stream {
            let t = report
                .time_to_first_token
                .as_ref()
                .expect("TTFT for streams");
            assert_eq!(t.samples, 12);
            assert!(t.p50 <= t.p99);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_request_in_flight() {
    let mut c = Cluster::two_shards(&fixture("v2"), &["--drain-timeout-s", "60"]);
    let router = c.endpoint();
    let mut client = c.client().await;
    let n = 300;
    let mut s = client
        .generate_stream(ids_request(&[50, 51, 52], n))
        .await
        .expect("stream")
        .into_inner();
    let first = s.message().await.expect("first message").expect("open");
    let mut tokens = first.token_ids.len();
    c.router.sigterm();
    // Wait until the router has acted on the signal: health flips or the port closes.
    let t0 = Instant::now();
    let mut flipped = false;
    while t0.elapsed() < Duration::from_secs(10) {
        let ep = tonic::transport::Endpoint::from_shared(router.clone()).expect("url");
        match ep.connect().await {
            Err(_) => {
                flipped = true;
                break;
            }
            Ok(ch) => match HealthClient::new(ch)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
            {
                Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => {}
                _ => {
                    flipped = true;
                    break;
                }
            },
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(flipped, "health still SERVING 10 s after SIGTERM");
    let mut summary = None;
    while let Some(m) = s
        .message()
        .await
        .expect("the in-flight stream was cut instead of drained")
    {
        tokens += m.token_ids.len();
        if m.summary.is_some() {
            summary = m.summary;
        }
    }
    let summary = summary.expect("the drained stream ended without its summary");
    assert_eq!(tokens, n as usize, "tokens received");
    assert_eq!(summary.completion_tokens, n);
    let status = c
        .router
        .wait_exit(Duration::from_secs(30))
        .expect("router did not exit after draining");
    assert!(status.success(), "router exit status {status}");
    // Afterwards nothing answers on the port.
    let ep = tonic::transport::Endpoint::from_shared(router).expect("url");
    assert!(
        ep.connect().await.is_err(),
        "the port still accepts connections"
    );
}
