//! Our tokenizer wrapper against the real DeepSeek-V2 tokenizer's reference vectors
//! (../shared/tokenizers/deepseek-v2: upstream HF ids, no BOS). Skips with a message where the
//! shared folder is absent (a user's fresh clone).

use std::io::BufRead;
use std::path::PathBuf;

use dsv2_core::tokenizer::Tokenizer;

fn shared() -> Option<PathBuf> {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/tokenizers/deepseek-v2");
    if p.join("tokenizer.json").exists() {
        Some(p)
    } else {
        eprintln!(
            "SKIP: {} not found (the shared folder is not beside this checkout)",
            p.display()
        );
        None
    }
}

fn load(dir: &std::path::Path) -> Tokenizer {
    let inner = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    // DeepSeek-V2: BOS 100000, add_bos_token true.
    Tokenizer::from_tokenizer(inner, Some(100000), true)
}

fn cases(path: &std::path::Path) -> Vec<(String, Vec<u32>)> {
    let f = std::fs::File::open(path).unwrap();
    std::io::BufReader::new(f)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l.unwrap()).unwrap();
            let ids = v["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            (v["text"].as_str().unwrap().to_string(), ids)
        })
        .collect()
}

#[test]
fn every_reference_vector_encodes_and_decodes() {
    let Some(dir) = shared() else { return };
    let tok = load(&dir);
    let cases = cases(&dir.join("vectors.jsonl"));
    assert_eq!(cases.len(), 46);
    for (text, ids) in &cases {
        assert_eq!(&tok.encode_raw(text).unwrap(), ids, "encoding {text:?}");
        assert_eq!(&tok.decode(ids).unwrap(), text, "decoding {ids:?}");
        let with_bos = tok.encode_prompt(text).unwrap();
        assert_eq!(with_bos[0], 100000);
        assert_eq!(&with_bos[1..], &ids[..]);
    }
}

#[test]
fn added_byte_symbols_decode_literally() {
    let Some(dir) = shared() else { return };
    let tok = load(&dir);
    // "für": ü is one of DeepSeek's 13 added tokens (100014); HF decodes it to U+FFFD, we keep it.
    let ids = tok.encode_raw("für").unwrap();
    assert_eq!(ids, vec![69, 100014, 81]);
    assert_eq!(tok.decode(&ids).unwrap(), "für");
    // BOS/EOS are special and never appear in text.
    assert_eq!(tok.decode(&[100000, 17464, 100001]).unwrap(), "Hello");
}

#[test]
fn streaming_detokenizer_never_splits_a_character() {
    let Some(dir) = shared() else { return };
    let tok = load(&dir);
    let text = "Äpfel 🍎 und Birnen — ½ Liter, 東京タワー";
    let ids = tok.encode_raw(text).unwrap();
    let mut dec = dsv2_core::tokenizer::IncrementalDecoder::default();
    let mut out = String::new();
    for &id in &ids {
        let delta = dec.push(&tok, id).unwrap();
        assert!(
            !delta.contains('\u{FFFD}'),
            "emitted a partial character after {id}"
        );
        out.push_str(&delta);
    }
    out.push_str(&dec.flush(&tok).unwrap());
    assert_eq!(out, text);
}

/// The 27,300-case regression set (generated in the shared folder, not upstream truth).
#[test]
fn extended_regression_vectors() {
    let Some(dir) = shared() else { return };
    let gz = dir.join("vectors-extended.jsonl.gz");
    let Ok(out) = std::process::Command::new("gzip")
        .arg("-dc")
        .arg(&gz)
        .output()
    else {
        eprintln!("SKIP: gzip not available");
        return;
    };
    let tok = load(&dir);
    let mut n = 0;
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let text = v["text"].as_str().unwrap();
        let ids: Vec<u32> = v["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode_raw(text).unwrap(), ids, "encoding {text:?}");
        n += 1;
    }
    assert!(n > 27000, "only {n} cases read");
}
