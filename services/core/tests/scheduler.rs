//! Scheduler policy of the continuous-batching engine (issue 3, item 4): admission is FIFO (a
//! small request never overtakes a waiting one that does not fit yet), and every step stays
//! within the token budget while running sequences keep decoding next to a chunked prefill.

use std::path::Path;
use std::sync::Arc;

use dsv2_core::cpu::CpuBackend;
use dsv2_core::engine::{Engine, EngineConfig, GenerateParams, SeqRequest};
use dsv2_core::model::load_local;

fn engine(cfg: EngineConfig) -> Engine<CpuBackend> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/v2");
    let (model, experts) = load_local(Arc::new(CpuBackend), &dir).unwrap();
    Engine::new(Arc::new(model), Arc::new(experts), None, cfg).unwrap()
}

fn request(id: u64, prompt_len: usize, max_new_tokens: usize) -> SeqRequest {
    SeqRequest {
        id,
        prompt: (0..prompt_len as u32)
            .map(|t| 3 + (t * 7 + id as u32) % 500)
            .collect(),
        params: GenerateParams {
            max_new_tokens,
            ignore_eos: true,
            ..Default::default()
        },
    }
}

#[test]
fn admission_is_fifo_even_when_a_later_request_would_fit() {
    // 4 blocks of 16 = 64 cache tokens.
    let mut e = engine(EngineConfig {
        num_blocks: 4,
        block_size: 16,
        ..EngineConfig::default()
    });
    e.submit(request(1, 20, 20)).unwrap(); // 40 tokens: 3 blocks
    e.submit(request(2, 30, 30)).unwrap(); // 60 tokens: 4 blocks, must wait for 1
    e.submit(request(3, 4, 4)).unwrap(); // 8 tokens: would fit in the free block
    e.step();
    assert_eq!(e.running(), 1, "only request 1 may run");
    assert_eq!(e.waiting(), 2, "request 3 must not overtake request 2");
    assert_eq!(e.free_blocks(), 1);
    // Once 1 leaves, 2 runs (taking every block); 3 still waits behind it.
    e.cancel(1).expect("request 1 is running");
    e.step();
    assert_eq!((e.running(), e.waiting(), e.free_blocks()), (1, 1, 0));
    e.cancel(2).expect("request 2 is running");
    e.step();
    assert_eq!((e.running(), e.waiting()), (1, 0), "request 3 runs last");
}

#[test]
fn steps_respect_the_token_budget_and_decodes_continue_during_a_long_prefill() {
    let budget = 8;
    let mut e = engine(EngineConfig {
        max_batch_tokens: budget,
        ..EngineConfig::default()
    });
    e.submit(request(1, 3, 40)).unwrap();
    // Request 1's prompt, then one decode step: it is now decoding.
    while e.stats.decode_tokens == 0 {
        e.step();
    }
    e.submit(request(2, 30, 4)).unwrap();
    let mut prefill_steps = 0;
    let mut prefilled = 0;
    while prefilled < 30 {
        assert!(prefill_steps < 50, "request 2's prefill makes no progress");
        let before = e.stats.clone();
        e.step();
        let decode = e.stats.decode_tokens - before.decode_tokens;
        let prefill = e.stats.prefill_tokens - before.prefill_tokens;
        assert!(
            decode + prefill <= budget as u64,
            "a step ran {decode} decode + {prefill} prefill tokens over a budget of {budget}"
        );
        assert_eq!(
            decode, 1,
            "request 1 must decode in every step of 2's prefill"
        );
        prefilled += prefill;
        prefill_steps += 1;
    }
    assert_eq!(prefilled, 30);
    // 7 prompt tokens fit next to the decode per step: 30 tokens take 5 steps.
    assert_eq!(prefill_steps, 5);
    assert_eq!(e.running(), 2);
}
