//! The prefix cache's host tier through router + 2 expert shards (tiny model, CPU, loopback): a
//! device cache too small to keep four families' prefixes, with `--host-cache-gb`, gives the same
//! outputs as `--no-prefix-cache`; prefixes come back from host memory (router metrics), and the
//! restored tokens count as cached in gRPC's `cached_prompt_tokens` and in HTTP's
//! `usage.prompt_tokens_details.cached_tokens`.

use dsv2_e2e::{Cluster, ids_request, metric_sum, parse_metrics, post_json, scrape, tiny_model};
use dsv2_proto::inference::v1 as pb;
use serde_json::{Value, json};

/// Four families of a 100-token prefix; request i of family f has its own 5-token tail.
fn prompt(f: u32, i: u32) -> Vec<u32> {
    let prefix = (0..100).map(|t| 3 + (t * 13 + f * 101) % 900);
    let tail = (0..5).map(|t| 3 + (t * 7 + i * 31 + f * 5 + 500) % 900);
    prefix.chain(tail).collect()
}

async fn run(cluster: &Cluster, ids: &[u32]) -> pb::GenerateResponse {
    let mut c = cluster.client().await;
    c.generate(ids_request(ids, 8))
        .await
        .expect("Generate")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_evicted_to_host_memory_come_back_with_the_same_outputs() {
    let dir = tiny_model();
    // 24 blocks of 16: three requests of 105 + 8 tokens (8 blocks) fit, the fourth evicts.
    let tiered = Cluster::two_shards(
        &dir,
        &[
            "--kv-cache-blocks",
            "24",
            "--host-cache-gb",
            "0.05",
            "--metrics-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
    );
    let plain = Cluster::two_shards(&dir, &["--kv-cache-blocks", "24", "--no-prefix-cache"]);
    let mut cached = 0;
    for round in 0..2 {
        for f in 0..4 {
            let ids = prompt(f, round);
            let a = run(&tiered, &ids).await;
            let b = run(&plain, &ids).await;
            assert_eq!(a.token_ids, b.token_ids, "family {f}, round {round}");
            assert_eq!(b.cached_prompt_tokens, 0);
            if round == 0 {
                assert_eq!(a.cached_prompt_tokens, 0, "family {f}, round 0");
            }
            cached += a.cached_prompt_tokens;
        }
    }
    let m = parse_metrics(&scrape(&tiered.router));
    let host_hits = metric_sum(&m, "dsv2_router_prefix_cache_host_hit_tokens_total", &[]);
    let restored = metric_sum(&m, "dsv2_router_kv_cache_host_restored_blocks_total", &[]);
    assert!(host_hits > 0.0, "nothing came back from the host tier");
    assert_eq!(host_hits, restored * 16.0);
    assert!(metric_sum(&m, "dsv2_router_kv_cache_host_cached_blocks", &[]) > 0.0);
    assert_eq!(
        metric_sum(&m, "dsv2_router_prefix_cache_hit_tokens_total", &[]),
        cached as f64,
        "restored tokens count as cached"
    );
    assert!(cached as f64 >= host_hits);

    // Over HTTP: family 0's prefix went to the host when the families after it came; it comes
    // back, and the usage counts all six of its whole blocks as cached.
    for f in 1..4 {
        run(&tiered, &prompt(f, 2)).await;
    }
    let before = host_hits;
    let ids = prompt(0, 3);
    let want = run(&plain, &ids).await;
    let http = tiered.router.http_addr.expect("--http-listen");
    let body = json!({"prompt": ids, "max_tokens": 8, "temperature": 0, "ignore_eos": true});
    let (status, text) = post_json(http, "/v1/completions", &body, &[]).await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(v["choices"][0]["text"], want.text.as_str());
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 96);
    let m = parse_metrics(&scrape(&tiered.router));
    assert!(
        metric_sum(&m, "dsv2_router_prefix_cache_host_hit_tokens_total", &[]) > before,
        "family 0 did not come back from the host tier"
    );
}
