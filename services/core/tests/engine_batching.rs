//! Continuous batching must not change results: requests that share steps (joining and leaving
//! at different times, prefill chunked next to decodes) produce exactly what each produces alone.

use std::path::Path;
use std::sync::Arc;

use dsv2_core::cpu::CpuBackend;
use dsv2_core::engine::{
    Engine, EngineConfig, EngineEvent, FinishReason, GenerateParams, SeqRequest, run_to_completion,
};
use dsv2_core::model::load_local;
use dsv2_core::sampling::SamplingParams;

fn engine(cfg: EngineConfig) -> Engine<CpuBackend> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/v2");
    let (model, experts) = load_local(Arc::new(CpuBackend), &dir).unwrap();
    Engine::new(Arc::new(model), Arc::new(experts), None, cfg).unwrap()
}

fn requests() -> Vec<SeqRequest> {
    (0..12u64)
        .map(|i| {
            let len = 1 + (i as usize * 7) % 40;
            SeqRequest {
                id: i,
                prompt: (0..len)
                    .map(|t| 3 + ((t as u32 * 31 + i as u32 * 17) % 500))
                    .collect(),
                params: GenerateParams {
                    max_new_tokens: 3 + (i as usize % 5) * 3,
                    sampling: if i % 3 == 0 {
                        SamplingParams {
                            temperature: 0.9,
                            top_k: 20,
                            top_p: 0.9,
                            seed: Some(i),
                        }
                    } else {
                        SamplingParams::default()
                    },
                    ignore_eos: true,
                    logprobs: if i % 4 == 1 { Some(3) } else { None },
                    prompt_logprobs: if i % 5 == 2 { Some(2) } else { None },
                    ..Default::default()
                },
            }
        })
        .collect()
}

#[test]
fn batched_equals_sequential() {
    let alone: Vec<_> = requests()
        .into_iter()
        .map(|r| {
            run_to_completion(&mut engine(EngineConfig::default()), vec![r])
                .unwrap()
                .remove(0)
        })
        .collect();
    // Small token budget: prompts are chunked and share steps with decodes.
    let cfg = EngineConfig {
        max_batch_tokens: 24,
        max_running: 5,
        num_blocks: 64,
        ..EngineConfig::default()
    };
    let together = run_to_completion(&mut engine(cfg), requests()).unwrap();
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(
            a.output_ids, b.output_ids,
            "request {i}: tokens differ when batched"
        );
        assert_eq!(a.finish_reason, FinishReason::Length);
        for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
            assert_eq!(x.token, y.token);
            assert!(
                (x.logprob - y.logprob).abs() < 1e-4,
                "request {i}: logprob {} vs {}",
                x.logprob,
                y.logprob
            );
        }
        assert_eq!(a.prompt_logprobs.len(), b.prompt_logprobs.len());
        if i % 5 == 2 {
            assert_eq!(
                a.prompt_logprobs.len(),
                requests()[i].prompt.len() - 1,
                "one logprob per prompt token after the first"
            );
        }
    }
}

#[test]
fn cancel_frees_blocks_and_admission_waits_for_room() {
    let cfg = EngineConfig {
        num_blocks: 4,
        block_size: 16,
        ..EngineConfig::default()
    };
    let mut e = engine(cfg);
    let long = |id| SeqRequest {
        id,
        prompt: vec![5; 30],
        params: GenerateParams {
            max_new_tokens: 30,
            ignore_eos: true,
            ..Default::default()
        },
    };
    e.submit(long(1)).unwrap();
    e.submit(long(2)).unwrap();
    e.step();
    assert_eq!(
        e.running(),
        1,
        "only one 60-token request fits in 64 cache tokens"
    );
    assert_eq!(e.waiting(), 1);
    assert_eq!(e.free_blocks(), 0);
    match e.cancel(1) {
        Some(EngineEvent::Finished {
            reason: FinishReason::Cancelled,
            ..
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(e.free_blocks(), 4, "cancel returns the blocks at once");
    e.step();
    assert_eq!(e.running(), 1, "the waiting request is admitted");
}

#[test]
fn validation_names_the_field() {
    let e = engine(EngineConfig {
        num_blocks: 2,
        block_size: 16,
        ..EngineConfig::default()
    });
    let p = |n| GenerateParams {
        max_new_tokens: n,
        ..Default::default()
    };
    let msg = |prompt: &[u32], params: &GenerateParams| {
        e.validate(prompt, params).unwrap_err().to_string()
    };
    assert!(msg(&[], &p(4)).contains("prompt"));
    assert!(msg(&[1], &p(0)).contains("max_new_tokens"));
    assert!(msg(&[9999], &p(4)).contains("token id 9999"));
    assert!(msg(&[1; 30], &p(10)).contains("KV cache"));
    let mut bad = p(4);
    bad.sampling.top_p = 0.0;
    assert!(msg(&[1], &bad).contains("top_p"));
    bad.sampling.top_p = 1.0;
    bad.sampling.temperature = -0.5;
    assert!(msg(&[1], &bad).contains("temperature"));
    let mut stops = p(4);
    stops.stop_strings = vec!["x".into()];
    assert!(msg(&[1], &stops).contains("no tokenizer"));
}

#[test]
fn stop_strings_cut_the_text_and_streamed_deltas_never_show_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = dsv2_core::tiny::ensure(tmp.path()).unwrap();
    let (model, experts) = load_local(Arc::new(CpuBackend), &dir).unwrap();
    let tok = Arc::new(
        dsv2_core::tokenizer::Tokenizer::from_model_dir(&dir, model.cfg.bos_token_id).unwrap(),
    );
    let (model, experts) = (Arc::new(model), Arc::new(experts));
    let prompt = tok.encode_prompt("The router receives a request").unwrap();
    let run = |stops: Vec<String>| {
        let mut e = Engine::new(
            model.clone(),
            experts.clone(),
            Some(tok.clone()),
            EngineConfig::default(),
        )
        .unwrap();
        let params = GenerateParams {
            max_new_tokens: 40,
            stop_strings: stops,
            ignore_eos: true,
            ..Default::default()
        };
        e.submit(SeqRequest {
            id: 7,
            prompt: prompt.clone(),
            params,
        })
        .unwrap();
        let mut deltas = Vec::new();
        let mut reason = None;
        let mut matched = None;
        while e.has_work() {
            for ev in e.step() {
                match ev {
                    EngineEvent::Token { text, .. } => deltas.push(text),
                    EngineEvent::Finished {
                        text,
                        reason: r,
                        matched_stop,
                        ..
                    } => {
                        deltas.push(text);
                        reason = Some(r);
                        matched = matched_stop;
                    }
                    _ => {}
                }
            }
        }
        (deltas, reason.unwrap(), matched)
    };
    let (free, reason, matched) = run(vec![]);
    assert_eq!(reason, FinishReason::Length);
    assert_eq!(matched, None);
    let full: String = free.concat();
    // Stop at a 3-character piece from the middle of the free-running text.
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    assert!(
        chars.len() > 12,
        "tiny model produced too little text: {full:?}"
    );
    let (start, _) = chars[chars.len() / 2];
    let end = chars
        .get(chars.len() / 2 + 3)
        .map(|c| c.0)
        .unwrap_or(full.len());
    let stop = full[start..end].to_string();
    // a stop string that never appears is listed first: the one that matched is reported
    let (deltas, reason, matched) = run(vec!["\u{1}never".into(), stop.clone()]);
    let text: String = deltas.concat();
    assert_eq!(reason, FinishReason::Stop);
    assert_eq!(matched.as_deref(), Some(stop.as_str()));
    assert_eq!(
        text,
        full[..full.find(&stop).unwrap()],
        "text must end right before the stop string"
    );
    assert!(deltas.iter().all(|d| !d.contains(&stop)));
}

/// The start-up warm-up leaves no trace: every cache block free, counters at zero, and the
/// requests that follow produce exactly what they produce on a fresh engine.
#[test]
fn warm_up_leaves_no_trace() {
    let cfg = EngineConfig::default();
    let mut warm = engine(cfg.clone());
    let took = warm.warm_up().unwrap();
    assert!(took.as_nanos() > 0);
    assert_eq!(warm.free_blocks(), warm.num_blocks());
    assert_eq!(warm.stats.steps, 0);
    assert!(!warm.has_work());
    let reqs: Vec<SeqRequest> = requests().into_iter().take(4).collect();
    let after = run_to_completion(&mut warm, reqs.clone()).unwrap();
    let fresh = run_to_completion(&mut engine(cfg), reqs).unwrap();
    for (a, f) in after.iter().zip(&fresh) {
        assert_eq!(a.output_ids, f.output_ids);
        assert_eq!(a.logprobs, f.logprobs);
    }
}
