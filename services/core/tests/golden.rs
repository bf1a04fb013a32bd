//! The CPU reference against Hugging Face transformers: logits at every position and greedy
//! continuations of the golden fixtures made by tests/fixtures/make_reference.py.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dsv2_core::backend::AttnMode;
use dsv2_core::cpu::CpuBackend;
use dsv2_core::model::{load_local, position_logits};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

struct Case {
    input_ids: Vec<u32>,
    logits: Vec<f32>,
    greedy: Vec<u32>,
}

fn cases(name: &str) -> Vec<Case> {
    let dir = fixture(name);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap();
            let t = st.tensor(&format!("{name}.logits")).unwrap();
            let logits = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let ids = |v: &serde_json::Value| {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            };
            Case {
                input_ids: ids(&c["input_ids"]),
                logits,
                greedy: ids(&c["greedy"]["output_ids"]),
            }
        })
        .collect()
}

/// Max abs difference relative to the logit scale (max |reference|, at least 1).
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
        / scale
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn check_fixture(name: &str) {
    let (model, experts) = load_local(Arc::new(CpuBackend), &fixture(name)).unwrap();
    let vocab = model.cfg.vocab_size;
    for (ci, case) in cases(name).iter().enumerate() {
        let t = case.input_ids.len();
        for mode in [AttnMode::Naive, AttnMode::Absorbed, AttnMode::Auto] {
            let full = position_logits(&model, &experts, &case.input_ids, None, mode).unwrap();
            let e = rel_err(&full, &case.logits);
            assert!(
                e < 1e-4,
                "{name} case{ci} ({t} tokens) {mode:?} prefill: rel err {e}"
            );
            if t > 1 {
                let k = (t / 2).max(1);
                let dec =
                    position_logits(&model, &experts, &case.input_ids, Some(k), mode).unwrap();
                let e = rel_err(&dec, &case.logits);
                assert!(
                    e < 1e-4,
                    "{name} case{ci} {mode:?} decode-from {k}: rel err {e}"
                );
                let e = rel_err(&dec, &full);
                assert!(
                    e < 1e-5,
                    "{name} case{ci} {mode:?} decode-from {k} vs prefill: rel err {e}"
                );
            }
        }
        // Greedy continuation, fed back through the cache one token at a time.
        let mut seq = case.input_ids.clone();
        for _ in 0..case.greedy.len() {
            let logits = position_logits(
                &model,
                &experts,
                &seq,
                Some(case.input_ids.len()),
                AttnMode::Auto,
            )
            .unwrap();
            seq.push(argmax(&logits[(seq.len() - 1) * vocab..]));
        }
        assert_eq!(
            &seq[t..],
            &case.greedy[..],
            "{name} case{ci}: greedy continuation differs"
        );
    }
}

#[test]
fn v2_matches_hf() {
    check_fixture("v2");
}

#[test]
fn v2_lite_matches_hf() {
    check_fixture("v2-lite");
}

#[test]
fn dense2_matches_hf() {
    check_fixture("dense2");
}
