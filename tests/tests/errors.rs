//! Admission over the wire: every invalid request gets INVALID_ARGUMENT naming the field, a full
//! queue gets RESOURCE_EXHAUSTED, and a cancelled stream gives its cache blocks back at once.

use std::time::{Duration, Instant};

use dsv2_e2e::{Cluster, fixture, generate, generate_stream, ids_request};
use dsv2_proto::inference::v1 as pb;
use tonic::Code;

fn text(t: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(t.into())),
        max_new_tokens: Some(4),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_invalid_argument_naming_the_field() {
    // v2 fixture: vocab 512, context 2560. 8 blocks of 16 = a 128-token cache.
    let c = Cluster::two_shards(&fixture("v2"), &["--kv-cache-blocks", "8"]);
    let mut client = c.client().await;
    let ok = ids_request(&[5, 6, 7], 4);
    let cases: Vec<(&str, pb::GenerateRequest, &str)> = vec![
        (
            "no prompt",
            pb::GenerateRequest {
                prompt: None,
                ..ok.clone()
            },
            "prompt",
        ),
        ("empty text", text(""), "prompt"),
        ("empty token_ids", ids_request(&[], 4), "prompt"),
        ("max_new_tokens 0", ids_request(&[5], 0), "max_new_tokens"),
        (
            "prompt + max_new_tokens beyond the context",
            ids_request(&[5; 10], 2551),
            "max_new_tokens",
        ),
        (
            "top_p 0",
            pb::GenerateRequest {
                top_p: Some(0.0),
                ..ok.clone()
            },
            "top_p",
        ),
        (
            "top_p 1.5",
            pb::GenerateRequest {
                top_p: Some(1.5),
                ..ok.clone()
            },
            "top_p",
        ),
        (
            "negative temperature",
            pb::GenerateRequest {
                temperature: Some(-0.5),
                ..ok.clone()
            },
            "temperature",
        ),
        ("unknown token id", ids_request(&[5, 512, 6], 4), "512"),
        (
            "prompt longer than the KV cache",
            ids_request(&[5; 200], 1),
            "prompt",
        ),
        (
            "prompt + max_new_tokens longer than the KV cache",
            ids_request(&[5; 100], 40),
            "KV cache",
        ),
    ];
    for (what, req, field) in cases {
        for streamed in [false, true] {
            let r = if streamed {
                generate_stream(&mut client, req.clone()).await
            } else {
                generate(&mut client, req.clone()).await
            };
            let kind = if streamed { "stream" } else { "unary" };
            let e = r.expect_err(&format!("{what} ({kind}) was accepted"));
            assert_eq!(
                e.code(),
                Code::InvalidArgument,
                "{what} ({kind}): {}",
                e.message()
            );
            assert!(
                e.message().contains(field),
                "{what} ({kind}): message {:?} does not name {field:?}",
                e.message()
            );
        }
    }
    // The unknown id message names the field too.
    let e = generate(&mut client, ids_request(&[512], 1))
        .await
        .expect_err("unknown id accepted");
    assert!(e.message().starts_with("prompt"), "{}", e.message());
    // And the router still serves valid requests afterwards.
    let out = generate(&mut client, ok).await.expect("a valid request");
    assert_eq!(out.token_ids.len(), 4);
}

/// A stream of a long request, read until its first tokens arrive.
async fn start_long_stream(
    client: &mut dsv2_proto::inference::v1::inference_client::InferenceClient<
        tonic::transport::Channel,
    >,
    max_new: u32,
    tokens_to_read: usize,
) -> (tonic::Streaming<pb::GenerateStreamResponse>, Vec<u32>) {
    let mut s = client
        .generate_stream(ids_request(&[11, 12, 13, 14, 15, 16, 17, 18], max_new))
        .await
        .expect("long request accepted")
        .into_inner();
    let mut got = Vec::new();
    while got.len() < tokens_to_read {
        let m = s
            .message()
            .await
            .expect("stream ok")
            .expect("stream still open");
        got.extend(m.token_ids);
    }
    (s, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_resource_exhausted_and_frees_up() {
    // 200 blocks × 16 = 3200 cache tokens: one 2008-token request fits, a second must wait.
    let c = Cluster::two_shards(
        &fixture("v2"),
        &["--kv-cache-blocks", "200", "--max-queue", "2"],
    );
    let mut client = c.client().await;
    let (running, _) = start_long_stream(&mut client, 2000, 2).await;
    let mut waiting = client
        .generate_stream(ids_request(&[21, 22, 23, 24, 25, 26, 27, 28], 2000))
        .await
        .expect("second long request queued")
        .into_inner();
    let e = generate(&mut client, ids_request(&[1, 2, 3], 2))
        .await
        .expect_err("a third request was accepted with --max-queue 2");
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("max-queue"), "{}", e.message());
    let e = generate_stream(&mut client, ids_request(&[1, 2, 3], 2))
        .await
        .expect_err("a third stream was accepted with --max-queue 2");
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    // The queued request has produced nothing: it cannot be admitted while the first runs.
    let early = tokio::time::timeout(Duration::from_millis(300), waiting.message()).await;
    assert!(
        early.is_err(),
        "the second request produced output while the first held the cache: {early:?}"
    );
    // Both leave; their slots come back.
    drop(running);
    drop(waiting);
    let t0 = Instant::now();
    loop {
        match generate(&mut client, ids_request(&[1, 2, 3], 2)).await {
            Ok(o) => {
                assert_eq!(o.token_ids.len(), 2);
                break;
            }
            Err(e)
                if e.code() == Code::ResourceExhausted
                    && t0.elapsed() < Duration::from_secs(10) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("queue slots did not come back after both clients left: {e}"),
        }
    }
}

/// The cache holds one long request at a time (130 blocks; a request needs 126). A stream is
/// dropped after a few tokens; a second long request must then start at once, which it can
/// only do if the cancelled request's blocks were freed (otherwise it waits for ~2000 tokens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_stream_frees_its_cache_blocks() {
    let c = Cluster::two_shards(&fixture("v2"), &["--kv-cache-blocks", "130"]);
    let mut client = c.client().await;
    let t_first = Instant::now();
    let (first, first_tokens) = start_long_stream(&mut client, 2000, 3).await;
    let per_three = t_first.elapsed();
    drop(first);
    let t0 = Instant::now();
    let (mut second, _) = start_long_stream(&mut client, 2000, 1).await;
    let ttft = t0.elapsed();
    // 2000 decode steps of the first request take far longer than this on any machine.
    assert!(
        ttft < Duration::from_secs(10),
        "the second long request waited {ttft:?} for its first token (the first took {per_three:?} \
         for 3 tokens): the cancelled stream's cache blocks were not freed"
    );
    // Cancel the second one too, then a request that needs the whole cache completes.
    let m = second.message().await.expect("second stream ok");
    assert!(m.is_some());
    drop(second);
    let t1 = Instant::now();
    // The same greedy prompt reserving 126 blocks again, stopping at the third token it
    // generated before: admitted only if the second request's blocks came back too.
    let mut req = ids_request(&[11, 12, 13, 14, 15, 16, 17, 18], 2000);
    req.stop_token_ids = vec![first_tokens[2]];
    let out = generate(&mut client, req).await.expect("third request");
    assert_eq!(out.finish_reason, pb::FinishReason::Stop as i32);
    assert!(out.token_ids.len() <= 3, "{:?}", out.token_ids);
    assert_eq!(out.token_ids, first_tokens[..out.token_ids.len()]);
    assert!(
        t1.elapsed() < Duration::from_secs(10),
        "third request took {:?}",
        t1.elapsed()
    );
}

/// A client deadline that passes mid-generation ends the request with DEADLINE_EXCEEDED (unary
/// and streamed), and the engine drops it: a request needing the whole cache runs afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passed_deadline_is_deadline_exceeded_and_frees_the_cache() {
    let c = Cluster::two_shards(&fixture("v2"), &["--kv-cache-blocks", "130"]);
    let mut client = c.client().await;
    let long = || ids_request(&[61, 62, 63, 64, 65, 66, 67, 68], 2000);
    let mut req = tonic::Request::new(long());
    req.set_timeout(Duration::from_millis(500));
    let t0 = Instant::now();
    let e = client
        .generate(req)
        .await
        .expect_err("2000 tokens finished within 500 ms");
    assert_eq!(e.code(), Code::DeadlineExceeded, "unary: {}", e.message());
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    let mut req = tonic::Request::new(long());
    req.set_timeout(Duration::from_millis(500));
    let mut s = client
        .generate_stream(req)
        .await
        .expect("stream accepted")
        .into_inner();
    let e = loop {
        match s.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream finished 2000 tokens within 500 ms"),
            Err(e) => break e,
        }
    };
    assert_eq!(e.code(), Code::DeadlineExceeded, "stream: {}", e.message());
    // Both requests left the engine: one needing 126 of the 130 blocks starts at once.
    let (first, tokens) = (Instant::now(), {
        let mut s = client
            .generate_stream(long())
            .await
            .expect("accepted")
            .into_inner();
        let m = s.message().await.expect("ok").expect("a token");
        m.token_ids
    });
    assert_eq!(tokens.len(), 1);
    assert!(
        first.elapsed() < Duration::from_secs(10),
        "waited {:?}: a request past its deadline kept its cache blocks",
        first.elapsed()
    );
}
