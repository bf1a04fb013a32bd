//! The router's tower layers over real processes: `--max-concurrent` sheds calls beyond it with
//! RESOURCE_EXHAUSTED (a stream counts until it ends, health stays exempt) and takes new calls
//! again once one leaves; `--request-timeout-s` ends a slow unary call DEADLINE_EXCEEDED from the
//! layer (naming the flag, even under a longer client deadline) and a slow stream through the
//! engine deadline, and the timed-out requests give their cache back.

use std::time::{Duration, Instant};

use dsv2_e2e::{Cluster, fixture, generate, ids_request};
use dsv2_proto::inference::v1 as pb;
use dsv2_proto::inference::v1::inference_client::InferenceClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Most tokens the v2 fixture (2560-token context) allows after an 8-token prompt: 3.6-3.9 s of
/// decoding through two shards in the debug build on the 2-core dev machine (`dsv2 up` +
/// `dsv2 generate --endpoint`), seven times the 0.5 s timeout below, and far longer than the
/// checks made beside it.
const LONG: u32 = 2500;

fn long_request(first: u32) -> pb::GenerateRequest {
    let ids: Vec<u32> = (first..first + 8).collect();
    ids_request(&ids, LONG)
}

async fn model_info(client: &mut InferenceClient<Channel>) -> Result<(), tonic::Status> {
    client.model_info(pb::ModelInfoRequest {}).await.map(|_| ())
}

fn assert_shed(r: Result<(), tonic::Status>, what: &str) {
    let e = r.expect_err(&format!("{what} was served over --max-concurrent 1"));
    assert_eq!(e.code(), Code::ResourceExhausted, "{what}: {}", e.message());
    assert!(
        e.message().contains("--max-concurrent"),
        "{what}: the message does not name the flag: {}",
        e.message()
    );
}

/// Polls ModelInfo until it reports `want` (Ok when `None`), for at most 10 s.
async fn wait_for(client: &mut InferenceClient<Channel>, want: Option<Code>, what: &str) {
    let t0 = Instant::now();
    loop {
        let got = model_info(client).await.err().map(|e| e.code());
        if got == want {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: ModelInfo still answers {got:?} after 10 s, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_sheds_with_resource_exhausted_until_a_call_ends() {
    // --max-queue well above the limit: any RESOURCE_EXHAUSTED below comes from the layer.
    let c = Cluster::two_shards(
        &fixture("v2"),
        &["--max-concurrent", "1", "--max-queue", "8"],
    );
    let mut client = c.client().await;
    model_info(&mut client)
        .await
        .expect("an idle router serves");

    // A stream holds its slot after its headers went out, for as long as it runs.
    let mut stream = client
        .generate_stream(long_request(11))
        .await
        .expect("the first stream is served")
        .into_inner();
    stream
        .message()
        .await
        .expect("first token")
        .expect("stream open");
    assert_shed(model_info(&mut client).await, "ModelInfo beside a stream");
    assert_shed(
        generate(&mut client, ids_request(&[1, 2, 3], 2))
            .await
            .map(|_| ()),
        "Generate beside a stream",
    );
    assert_shed(
        client
            .generate_stream(ids_request(&[1, 2, 3], 2))
            .await
            .map(|_| ()),
        "GenerateStream beside a stream",
    );
    // A second connection shares the same limit.
    let mut other = c.client().await;
    assert_shed(
        model_info(&mut other).await,
        "ModelInfo on a second connection",
    );
    // Health is exempt: probes answer while the router is saturated.
    let health = HealthClient::new(dsv2_e2e::channel(&c.endpoint()).await)
        .check(HealthCheckRequest {
            service: "dsv2.v1.Inference".into(),
        })
        .await
        .expect("health answers while saturated")
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);

    // The client drops the stream: its slot comes back.
    drop(stream);
    wait_for(&mut client, None, "after the stream was dropped").await;

    // A slow unary call holds the slot until it answers. It must be admitted before the polls
    // below start: a poll that reaches the layer first takes the one slot and sheds the call
    // itself (CI once saw that race: ModelInfo then kept answering). So nothing else is sent
    // until it has had time to be admitted, and a call shed anyway is sent again.
    let mut unary = None;
    for _ in 0..5 {
        let mut unary_client = client.clone();
        let task = tokio::spawn(async move { generate(&mut unary_client, long_request(31)).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        if !task.is_finished() {
            unary = Some(task);
            break;
        }
        match task.await {
            Ok(Err(e)) if e.code() == Code::ResourceExhausted => continue,
            other => panic!("the long unary call ended within 0.3 s: {other:?}"),
        }
    }
    let unary = unary.expect("the long unary call was shed 5 times over an idle router");
    wait_for(
        &mut client,
        Some(Code::ResourceExhausted),
        "while a long unary call runs",
    )
    .await;
    assert_shed(
        generate(&mut other, ids_request(&[1, 2, 3], 2))
            .await
            .map(|_| ()),
        "Generate beside a unary call",
    );
    // Cancelling it (dropping the call) frees the slot too.
    unary.abort();
    let _ = unary.await;
    wait_for(&mut client, None, "after the unary call was cancelled").await;
    let out = generate(&mut client, ids_request(&[1, 2, 3], 2))
        .await
        .expect("served again");
    assert_eq!(out.token_ids.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_ends_slow_calls_deadline_exceeded_and_frees_the_cache() {
    // A long request reserves 157 blocks of 16 (8 + 2500 tokens): 160 blocks hold exactly one,
    // so the last check below can only start if every timed-out request gave its blocks back.
    let c = Cluster::two_shards(
        &fixture("v2"),
        &["--request-timeout-s", "0.5", "--kv-cache-blocks", "160"],
    );
    let mut client = c.client().await;
    // Quick calls are untouched.
    model_info(&mut client).await.expect("ModelInfo");
    let out = generate(&mut client, ids_request(&[1, 2, 3], 2))
        .await
        .expect("a short request finishes within the timeout");
    assert_eq!(out.token_ids.len(), 2);

    // Unary, no client deadline: the layer answers at 0.5 s.
    let t0 = Instant::now();
    let e = generate(&mut client, long_request(11))
        .await
        .expect_err("a long unary call outlived --request-timeout-s 0.5");
    let waited = t0.elapsed();
    assert_eq!(e.code(), Code::DeadlineExceeded, "unary: {}", e.message());
    assert!(
        e.message().contains("--request-timeout-s"),
        "unary: not the router's timeout layer: {}",
        e.message()
    );
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(5),
        "unary: answered after {waited:?}"
    );

    // A longer client deadline does not extend the router's timeout.
    let mut req = tonic::Request::new(long_request(21));
    req.set_timeout(Duration::from_secs(60));
    let t0 = Instant::now();
    let e = client
        .generate(req)
        .await
        .expect_err("a 60 s client deadline extended --request-timeout-s 0.5");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{}", e.message());
    assert!(
        e.message().contains("--request-timeout-s"),
        "{}",
        e.message()
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    // A stream gets its headers at once; the engine deadline ends it at 0.5 s.
    let t0 = Instant::now();
    let mut s = client
        .generate_stream(long_request(31))
        .await
        .expect("stream accepted")
        .into_inner();
    let e = loop {
        match s.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream finished {LONG} tokens within --request-timeout-s 0.5"),
            Err(e) => break e,
        }
    };
    let waited = t0.elapsed();
    assert_eq!(e.code(), Code::DeadlineExceeded, "stream: {}", e.message());
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(5),
        "stream: ended after {waited:?}"
    );

    // Every timed-out request left the engine: a request needing most of the cache starts
    // (were any still holding its blocks, this one would wait past its own 0.5 s deadline).
    let mut s = client
        .generate_stream(long_request(41))
        .await
        .expect("accepted")
        .into_inner();
    let m = s
        .message()
        .await
        .expect("no token within --request-timeout-s 0.5: a timed-out request kept its cache")
        .expect("a token");
    assert_eq!(m.token_ids.len(), 1);
}
