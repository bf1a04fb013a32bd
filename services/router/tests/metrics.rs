//! The metrics text reflects what the engine did.

use std::path::Path;
use std::sync::Arc;

use dsv2_core::cpu::CpuBackend;
use dsv2_core::engine::{Engine, EngineConfig, EngineEvent, GenerateParams};
use dsv2_core::model::load_local;
use dsv2_router::engine_task::EngineHandle;

#[tokio::test]
async fn metrics_count_tokens_and_blocks() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/v2");
    let (model, experts) = load_local(Arc::new(CpuBackend), &dir).unwrap();
    let engine = Engine::new(
        Arc::new(model),
        Arc::new(experts),
        None,
        EngineConfig {
            num_blocks: 32,
            ..Default::default()
        },
    )
    .unwrap();
    let handle = EngineHandle::spawn(engine, 8);
    // 40 prompt tokens, then 35 of which the first 32 (two blocks of 16) are the same.
    let first: Vec<u32> = (0..40).map(|t| 3 + t).collect();
    let second: Vec<u32> = first[..32].iter().copied().chain([100, 101, 102]).collect();
    run_in_turn(&handle, [first, second]).await;
    // The engine publishes after the step that finished the request.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let text = dsv2_router::metrics::render(&handle);
    assert!(
        text.contains("dsv2_router_generated_tokens_total 12"),
        "{text}"
    );
    assert!(text.contains("dsv2_router_kv_cache_blocks 32"), "{text}");
    assert!(
        text.contains("dsv2_router_kv_cache_free_blocks 32"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE dsv2_router_engine_steps_total counter"),
        "{text}"
    );
    for line in [
        "dsv2_router_prefix_cache_queried_tokens_total 75",
        "dsv2_router_prefix_cache_hit_tokens_total 32",
        "dsv2_router_kv_cache_cached_blocks 2",
        "dsv2_router_kv_cache_evicted_blocks_total 0",
        "# TYPE dsv2_router_prefix_cache_hit_tokens_total counter",
        // no host tier
        "dsv2_router_kv_cache_host_blocks 0",
        "dsv2_router_prefix_cache_host_hit_tokens_total 0",
    ] {
        assert!(text.contains(line), "{line} missing from {text}");
    }
}

/// Host tier metrics: a device cache of 4 blocks evicts the first prompt's two cached blocks to
/// the host, and the third request copies them back.
#[tokio::test]
async fn metrics_count_the_host_tier() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/v2");
    let (model, experts) = load_local(Arc::new(CpuBackend), &dir).unwrap();
    let block_bytes = dsv2_core::backend::Backend::host_block_bytes(&CpuBackend, &model.cfg, 16);
    let engine = Engine::new(
        Arc::new(model),
        Arc::new(experts),
        None,
        EngineConfig {
            num_blocks: 4,
            host_cache_bytes: 16 * block_bytes as u64,
            ..Default::default()
        },
    )
    .unwrap();
    let handle = EngineHandle::spawn(engine, 8);
    let first: Vec<u32> = (0..40).map(|t| 3 + t).collect();
    let other: Vec<u32> = (0..58).map(|t| 200 + t).collect();
    let again: Vec<u32> = first[..32].iter().copied().chain([100, 101]).collect();
    run_in_turn(&handle, [first, other, again]).await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let text = dsv2_router::metrics::render(&handle);
    let value = |name: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing from {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(value("dsv2_router_kv_cache_host_blocks"), 16);
    assert_eq!(
        value("dsv2_router_prefix_cache_host_hit_tokens_total"),
        32,
        "{text}"
    );
    assert_eq!(
        value("dsv2_router_prefix_cache_hit_tokens_total"),
        32,
        "{text}"
    );
    assert_eq!(value("dsv2_router_kv_cache_host_restores_total"), 1);
    assert_eq!(value("dsv2_router_kv_cache_host_restored_blocks_total"), 2);
    assert_eq!(
        value("dsv2_router_kv_cache_host_restored_bytes_total"),
        2 * block_bytes as u64
    );
    let saved = value("dsv2_router_kv_cache_host_saved_blocks_total");
    assert!(saved >= 2, "{text}");
    assert_eq!(
        value("dsv2_router_kv_cache_host_saved_bytes_total"),
        saved * block_bytes as u64
    );
    assert!(value("dsv2_router_kv_cache_host_cached_blocks") >= 2);
    assert_eq!(value("dsv2_router_kv_cache_host_evicted_blocks_total"), 0);
}

/// Each prompt to the end (6 new tokens), one after the other, so that later ones can hit the
/// prefixes the earlier ones cached.
async fn run_in_turn<const N: usize>(handle: &EngineHandle, prompts: [Vec<u32>; N]) {
    for prompt in prompts {
        let (_, mut rx) = handle
            .submit(
                prompt,
                GenerateParams {
                    max_new_tokens: 6,
                    ignore_eos: true,
                    ..Default::default()
                },
                None,
            )
            .unwrap();
        while let Some(ev) = rx.recv().await {
            if matches!(ev, EngineEvent::Finished { .. }) {
                break;
            }
        }
    }
}
