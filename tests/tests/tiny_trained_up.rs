//! The README's first command on the trained tiny model: `dsv2 up --prompt "The router receives
//! a request"` (router + 2 expert shards, gRPC) answers in words of its training text, greedy and
//! with the demo's seeded sampling, and never prints a replacement character.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

use dsv2_e2e::bin;

const PROMPT: &str = "The router receives a request";

/// Every lower-cased word of the training text, as train.py wrote it.
fn training_words() -> HashSet<String> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../services/core/assets/tiny-trained/words.txt");
    std::fs::read_to_string(&p)
        .expect("words.txt")
        .lines()
        .map(String::from)
        .collect()
}

/// `dsv2 up --prompt PROMPT EXTRA...` on a fresh cache: the answer (stdout after the endpoint line).
fn up_answer(cache: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "up",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "off",
        "--prompt",
        PROMPT,
        "--max-output-len",
        "48",
    ];
    args.extend_from_slice(extra);
    let out = Command::new(bin("dsv2"))
        .args(&args)
        .env("DSV2_CACHE_DIR", cache)
        .output()
        .expect("running dsv2 up");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "dsv2 {args:?} failed: {stderr}");
    // `tiny` (the default) is the trained model; the random one was never written.
    assert!(cache.join(dsv2_core::tiny::TRAINED_VERSION).is_dir());
    assert!(!cache.join(dsv2_core::tiny::TINY_VERSION).exists());
    let stdout = String::from_utf8(out.stdout).expect("stdout is UTF-8");
    let (_, answer) = stdout
        .split_once('\n')
        .expect("endpoint line, then the answer");
    answer.to_string()
}

/// (words of `text` that are training words, all words): words are runs of ASCII letters.
fn word_hits(text: &str, vocab: &HashSet<String>) -> (usize, usize) {
    let words: Vec<String> = text
        .split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_ascii_lowercase())
        .collect();
    let hits = words.iter().filter(|w| vocab.contains(*w)).count();
    (hits, words.len())
}

#[test]
fn up_prompt_on_the_trained_tiny_model_answers_in_words() {
    let vocab = training_words();
    assert!(vocab.len() > 1000, "words.txt has {} words", vocab.len());
    // The check can fail: the random model's answer is mostly fragments that are not words.
    let (hits, n) = word_hits("ken WhatW one  wereut perq turn next it one", &vocab);
    assert!((hits as f64) < 0.9 * n as f64, "{hits}/{n}");
    let cache = tempfile::tempdir().expect("temp cache dir");
    let runs: [(&str, &[&str]); 3] = [
        ("greedy", &["--temperature", "0"]),
        ("demo default (temperature 0.7, top-p 0.9, seed 0)", &[]),
        ("seed 7", &["--seed", "7"]),
    ];
    for (name, extra) in runs {
        let answer = up_answer(cache.path(), extra);
        eprintln!("{name}: {PROMPT}{answer}");
        assert!(
            !answer.contains('\u{FFFD}'),
            "{name}: replacement character in {answer:?}"
        );
        let (hits, n) = word_hits(&answer, &vocab);
        assert!(n >= 10, "{name}: only {n} words: {answer:?}");
        let frac = hits as f64 / n as f64;
        eprintln!("{name}: {hits}/{n} = {:.1} % training words", 100.0 * frac);
        assert!(
            frac >= 0.9,
            "{name}: {hits}/{n} training words in {answer:?}"
        );
    }
}
