//! Router + expert shards as separate processes give the same tokens as the in-process engine:
//! greedy output per placement on the v2 golden fixture, text prompts on the tiny model, and 32
//! concurrent mixed requests each equal to their sequential result.

use dsv2_core::placement::PlacementKind;
use dsv2_e2e::{
    Cluster, Output, fixture, fixture_prompts, generate, generate_stream, ids_request, placement,
    reference_generate, text_request, tiny_model,
};
use dsv2_proto::inference::v1 as pb;

fn ids_arg(ids: &[u32]) -> String {
    ids.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Greedy continuations of the golden prompts (plus a longer run) over gRPC, unary and
/// streamed, against `dsv2 generate --json` in-process.
async fn check_greedy_equal(cluster: &Cluster, what: &str) {
    let mut client = cluster.client().await;
    let prompts = fixture_prompts("v2");
    for (i, p) in prompts.iter().enumerate() {
        let max_new = if i == 1 { 48 } else { 16 };
        let (want, _) = reference_generate(
            &cluster.model_dir,
            &[
                "--input-ids",
                &ids_arg(p),
                "--max-output-len",
                &max_new.to_string(),
                "--ignore-eos",
            ],
        );
        assert_eq!(want.len(), max_new as usize);
        let unary = generate(&mut client, ids_request(p, max_new))
            .await
            .unwrap_or_else(|e| panic!("{what}: Generate failed: {e}"));
        assert_eq!(
            unary.token_ids, want,
            "{what}: unary gRPC output differs from in-process for prompt {i}"
        );
        assert_eq!(unary.finish_reason, pb::FinishReason::Length as i32);
        let streamed = generate_stream(&mut client, ids_request(p, max_new))
            .await
            .unwrap_or_else(|e| panic!("{what}: GenerateStream failed: {e}"));
        assert_eq!(
            streamed.token_ids, want,
            "{what}: streamed gRPC output differs from in-process for prompt {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_matches_in_process_groups_placement() {
    let dir = fixture("v2");
    let shards = placement(&dir, 2, PlacementKind::Groups);
    let c = Cluster::start(&dir, &shards, &["--placement", "groups"]);
    check_greedy_equal(&c, "groups placement, 2 shards").await;
}

/// With 2 shards, contiguous ranges of the v2 fixture (16 experts, 4 groups of 4) coincide with
/// whole groups, so contiguous runs on 3 shards (6/5/5 experts): ranges that cut through
/// routing groups, so one token's experts spread over more shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_matches_in_process_contiguous_placement() {
    let dir = fixture("v2");
    let shards = placement(&dir, 3, PlacementKind::Contiguous);
    assert_eq!(shards[0].len(), 6, "expected ranges cutting through groups");
    let c = Cluster::start(&dir, &shards, &["--placement", "contiguous"]);
    check_greedy_equal(&c, "contiguous placement, 3 shards").await;
}

/// Experts interleaved over 2 shards (even / odd ids) from a placement file: every group is
/// split, so nearly every token needs both shards and partial sums from both are added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_matches_in_process_interleaved_placement_file() {
    let dir = fixture("v2");
    let even: Vec<usize> = (0..16).step_by(2).collect();
    let odd: Vec<usize> = (1..16).step_by(2).collect();
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(
        file.path(),
        serde_json::json!({ "shards": [even, odd] }).to_string(),
    )
    .expect("writing the placement file");
    let path = file.path().to_string_lossy().into_owned();
    let c = Cluster::start(&dir, &[even, odd], &["--placement", &path]);
    check_greedy_equal(&c, "interleaved placement file, 2 shards").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_model_text_prompts_match_in_process() {
    let dir = tiny_model();
    let c = Cluster::two_shards(&dir, &[]);
    let mut client = c.client().await;
    for (text, n) in [
        ("The router receives a request", 24u32),
        ("Hello", 12),
        (
            "Expert shards compute the routed experts of every MoE layer.",
            8,
        ),
    ] {
        let (want_ids, want_text) = reference_generate(
            &dir,
            &["--input-text", text, "--max-output-len", &n.to_string()],
        );
        let unary = generate(&mut client, text_request(text, n))
            .await
            .unwrap_or_else(|e| panic!("Generate {text:?}: {e}"));
        assert_eq!(unary.token_ids, want_ids, "token ids for {text:?}");
        assert_eq!(unary.text, want_text, "text for {text:?}");
        let streamed = generate_stream(&mut client, text_request(text, n))
            .await
            .unwrap_or_else(|e| panic!("GenerateStream {text:?}: {e}"));
        assert_eq!(streamed.token_ids, want_ids, "streamed ids for {text:?}");
        assert_eq!(streamed.text, want_text, "streamed text for {text:?}");
    }
}

/// Request `i` of the concurrency test: prompt length, max_new_tokens and sampling all vary.
fn mixed_request(i: usize) -> pb::GenerateRequest {
    let len = 1 + (i * 7) % 41;
    let prompt: Vec<u32> = (0..len)
        .map(|j| 3 + ((i * 131 + j * 17) % 500) as u32)
        .collect();
    let max_new = 4 + ((i * 5) % 21) as u32;
    let mut r = ids_request(&prompt, max_new);
    if i.is_multiple_of(3) {
        // Seeded sampling must be reproducible whatever else is in the batch.
        r.temperature = Some(0.8);
        r.top_p = Some(0.9);
        r.top_k = 50;
        r.seed = Some(1000 + i as u64);
    }
    r
}

async fn run_one(
    client: &mut dsv2_proto::inference::v1::inference_client::InferenceClient<
        tonic::transport::Channel,
    >,
    i: usize,
) -> Output {
    let req = mixed_request(i);
    let r = if i.is_multiple_of(2) {
        generate_stream(client, req).await
    } else {
        generate(client, req).await
    };
    r.unwrap_or_else(|e| panic!("request {i}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_equal_their_sequential_results() {
    let dir = fixture("v2");
    let c = Cluster::two_shards(&dir, &[]);
    let mut client = c.client().await;
    let n = 32;
    let mut sequential = Vec::new();
    for i in 0..n {
        sequential.push(run_one(&mut client, i).await);
    }
    // All at once, each on its own HTTP/2 stream of one connection.
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let mut cl = client.clone();
            tokio::spawn(async move { run_one(&mut cl, i).await })
        })
        .collect();
    let mut distinct_lengths = std::collections::BTreeSet::new();
    for (i, h) in handles.into_iter().enumerate() {
        let got = h.await.expect("request task");
        distinct_lengths.insert(got.token_ids.len());
        assert_eq!(
            got,
            sequential[i],
            "request {i} ({}, {}) differs when run with 31 others",
            if i % 2 == 0 { "streamed" } else { "unary" },
            if i.is_multiple_of(3) {
                "seeded sampling"
            } else {
                "greedy"
            }
        );
        assert_eq!(
            got.token_ids.len(),
            mixed_request(i).max_new_tokens.unwrap_or_default() as usize
        );
    }
    assert!(distinct_lengths.len() > 5, "lengths should vary");
}
