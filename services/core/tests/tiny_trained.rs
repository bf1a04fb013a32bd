//! The trained tiny model (`--model-dir tiny`) against what its script measured with Hugging Face
//! transformers (services/core/assets/tiny-trained/train.py): logits within 1e-4 of the logit
//! scale, so it is also a real-weights parity fixture, and held-out perplexity below a bound that
//! the same architecture with random weights misses by far.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dsv2_core::backend::AttnMode;
use dsv2_core::cpu::CpuBackend;
use dsv2_core::model::{load_local, load_local_with, position_logits};
use dsv2_core::tokenizer::Tokenizer;

/// Held-out perplexity the trained model must stay under (per token of its own tokenizer, over
/// heldout_sample.txt, sections of the Rust book it was not trained on). MANIFEST.json records
/// what training reached; an untrained model of the same shape is in the thousands.
const PERPLEXITY_BOUND: f64 = 200.0;

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-trained")
}

fn manifest() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(assets().join("MANIFEST.json")).unwrap()).unwrap()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Max abs difference relative to the logit scale (max |reference|, at least 1), as golden.rs.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
        / scale
}

#[test]
fn trained_tiny_logits_match_hf_transformers() {
    let cache = tempfile::tempdir().unwrap();
    let dir = dsv2_core::tiny::ensure_trained(cache.path()).unwrap();
    let (model, experts) = load_local(Arc::new(CpuBackend), &dir).unwrap();
    let bytes = std::fs::read(assets().join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for case in 0..2 {
        let ids: Vec<u32> = st
            .tensor(&format!("case{case}.input_ids"))
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect();
        let want = f32s(st.tensor(&format!("case{case}.logits")).unwrap().data());
        for mode in [AttnMode::Naive, AttnMode::Absorbed] {
            let got = position_logits(&model, &experts, &ids, None, mode).unwrap();
            let e = rel_err(&got, &want);
            assert!(
                e < 1e-4,
                "case{case} ({} tokens) {mode:?}: rel err {e}",
                ids.len()
            );
            let dec = position_logits(&model, &experts, &ids, Some(ids.len() / 2), mode).unwrap();
            let e = rel_err(&dec, &want);
            assert!(
                e < 1e-4,
                "case{case} {mode:?} through the cache: rel err {e}"
            );
        }
    }
}

/// exp(mean NLL) over windows of [BOS] + 127 tokens of `text`, as train.py computes it; at most
/// `max_windows` windows.
fn perplexity(dir: &Path, random: Option<u64>, text: &str, max_windows: usize) -> f64 {
    let (model, experts) = load_local_with(Arc::new(CpuBackend), dir, random).unwrap();
    let tok = Tokenizer::from_model_dir(dir, model.cfg.bos_token_id).unwrap();
    let bos = tok.bos().unwrap();
    let ids = tok.encode_raw(text).unwrap();
    let vocab = model.cfg.vocab_size;
    let (mut nll, mut n) = (0f64, 0usize);
    for w in ids.chunks_exact(127).take(max_windows) {
        let row: Vec<u32> = std::iter::once(bos).chain(w.iter().copied()).collect();
        let logits = position_logits(&model, &experts, &row, None, AttnMode::Auto).unwrap();
        for (t, next) in row.iter().enumerate().skip(1) {
            let l = &logits[(t - 1) * vocab..t * vocab];
            let max = l.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)) as f64;
            let lse = max + l.iter().map(|v| (*v as f64 - max).exp()).sum::<f64>().ln();
            nll += lse - l[*next as usize] as f64;
            n += 1;
        }
    }
    assert!(n > 0, "no full window in the text");
    (nll / n as f64).exp()
}

#[test]
fn trained_tiny_held_out_perplexity_is_low_and_random_weights_fail_it() {
    let cache = tempfile::tempdir().unwrap();
    let dir = dsv2_core::tiny::ensure_trained(cache.path()).unwrap();
    let text = std::fs::read_to_string(assets().join("heldout_sample.txt")).unwrap();
    let ours = perplexity(&dir, None, &text, usize::MAX);
    let hf = manifest()["heldout_sample_perplexity"].as_f64().unwrap();
    let random = perplexity(&dir, Some(1), &text, 4);
    eprintln!(
        "held-out perplexity (heldout_sample.txt): trained {ours:.2} (HF {hf:.2}, all held-out \
         sections {}), random weights {random:.1}, bound {PERPLEXITY_BOUND}",
        manifest()["heldout_perplexity"]
    );
    assert!(
        (ours - hf).abs() / hf < 1e-3,
        "ours {ours} vs HF transformers {hf}"
    );
    assert!(
        ours < PERPLEXITY_BOUND,
        "perplexity {ours} ≥ {PERPLEXITY_BOUND}"
    );
    assert!(
        random > 10.0 * PERPLEXITY_BOUND,
        "random weights reach {random}: the bound says nothing"
    );
}
