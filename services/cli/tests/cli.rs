//! The `dsv2` binary end to end: outputs against the golden fixtures, and every bad input gets
//! an error that says what is wrong.

use std::path::PathBuf;
use std::process::Command;

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn dsv2(args: &[&str]) -> (bool, String, String) {
    let cache = std::env::temp_dir().join("dsv2-cli-test-cache");
    let out = Command::new(env!("CARGO_BIN_EXE_dsv2"))
        .args(args)
        .env("DSV2_CACHE_DIR", cache)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn reference(name: &str, case: usize) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    let dir = PathBuf::from(fixture(name));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let c = &json["cases"][case];
    let ids = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect::<Vec<u32>>()
    };
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(&format!("case{case}.logits")).unwrap();
    let logits = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (
        ids(&c["input_ids"]),
        ids(&c["greedy"]["output_ids"]),
        logits,
    )
}

fn csv(ids: &[u32]) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn logits_command_matches_hf_with_and_without_decode_from() {
    let (input, _, want) = reference("v2", 2);
    let dir = tempfile::tempdir().unwrap();
    for decode_from in [None, Some("5")] {
        let out = dir.path().join("l.safetensors");
        let mut args = vec!["logits", "--model-dir", &fixture("v2")]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        let ids = csv(&input);
        args.extend([
            "--token-ids".into(),
            ids,
            "--out".into(),
            out.to_string_lossy().into_owned(),
        ]);
        if let Some(k) = decode_from {
            args.extend(["--decode-from".into(), k.into()]);
        }
        let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let (ok, _, err) = dsv2(&refs);
        assert!(ok, "{err}");
        let bytes = std::fs::read(&out).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("logits").unwrap();
        assert_eq!(t.shape(), &[input.len(), 512]);
        let got: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
            / scale;
        assert!(err < 1e-4, "decode_from {decode_from:?}: rel err {err}");
    }
}

#[test]
fn generate_json_matches_hf_greedy() {
    let (input, greedy, _) = reference("v2-lite", 1);
    let (ok, out, err) = dsv2(&[
        "generate",
        "--model-dir",
        &fixture("v2-lite"),
        "--input-ids",
        &csv(&input),
        "--max-output-len",
        "16",
        "--ignore-eos",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let got: Vec<u32> = v["output_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(got, greedy);
    assert_eq!(v["finish_reason"], "length");
}

#[test]
fn prompt_logprobs_match_hf_logits() {
    let (input, _, logits) = reference("v2", 2);
    let (ok, out, err) = dsv2(&[
        "generate",
        "--model-dir",
        &fixture("v2"),
        "--input-ids",
        &csv(&input),
        "--max-output-len",
        "1",
        "--json",
        "--prompt-logprobs",
        "2",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let plps = v["prompt_logprobs"].as_array().unwrap();
    assert_eq!(plps.len(), input.len());
    assert!(plps[0]["logprob"].is_null());
    let vocab = logits.len() / input.len();
    for (p, entry) in plps.iter().enumerate().skip(1) {
        // position p is scored by the logits of position p - 1
        let row = &logits[(p - 1) * vocab..p * vocab];
        let max = row.iter().fold(f32::MIN, |m, &x| m.max(x));
        let lse = max + row.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
        let want = row[input[p] as usize] - lse;
        let got = entry["logprob"].as_f64().unwrap() as f32;
        assert!(
            (got - want).abs() < 1e-3,
            "position {p}: {got} vs HF {want}"
        );
        assert_eq!(entry["token"].as_u64().unwrap() as u32, input[p]);
        let top = entry["top"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        let best = row
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b });
        assert_eq!(top[0][0].as_u64().unwrap() as usize, best.0, "position {p}");
    }
}

#[test]
fn tiny_model_generates_text_without_downloads() {
    let (ok, out, err) = dsv2(&[
        "generate",
        "--input-text",
        "The router receives a request",
        "--max-output-len",
        "8",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["output_ids"].as_array().unwrap().len(), 8);
    assert_eq!(v["input_ids"][0], 0, "BOS first");
}

#[test]
fn bad_inputs_say_what_is_wrong() {
    let v2 = fixture("v2");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.safetensors");
    let out = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "logits",
                "--model-dir",
                &v2,
                "--token-ids",
                "1,2,x",
                "--out",
                out,
            ],
            "--token-ids: `x` is not a token id",
        ),
        (
            vec![
                "logits",
                "--model-dir",
                &v2,
                "--token-ids",
                "1,2,3",
                "--decode-from",
                "0",
                "--out",
                out,
            ],
            "--decode-from 0",
        ),
        (
            vec![
                "logits",
                "--model-dir",
                &v2,
                "--token-ids",
                "1,2,3",
                "--decode-from",
                "4",
                "--out",
                out,
            ],
            "--decode-from 4",
        ),
        (
            vec![
                "logits",
                "--model-dir",
                &v2,
                "--token-ids",
                "1,2,600",
                "--out",
                out,
            ],
            "token id 600 is outside the vocabulary",
        ),
        (
            vec!["logits", "--model-dir", &v2, "--text", "hi", "--out", out],
            "no tokenizer.json",
        ),
        (
            vec![
                "logits",
                "--model-dir",
                "/nonexistent/dir",
                "--token-ids",
                "1",
                "--out",
                out,
            ],
            "is not a model directory",
        ),
        (
            vec![
                "logits",
                "--model-dir",
                &v2,
                "--token-ids",
                "1",
                "--out",
                "/nonexistent/dir/x.safetensors",
            ],
            "writing /nonexistent/dir/x.safetensors",
        ),
        (
            vec![
                "generate",
                "--model-dir",
                &v2,
                "--input-ids",
                "1,2",
                "--max-output-len",
                "0",
            ],
            "max_new_tokens",
        ),
        (
            vec![
                "generate",
                "--model-dir",
                &v2,
                "--input-ids",
                "1,2",
                "--top-p",
                "1.5",
            ],
            "top_p",
        ),
        (
            vec![
                "generate",
                "--model-dir",
                &v2,
                "--input-ids",
                "1,2",
                "--temperature",
                "-1",
            ],
            "temperature",
        ),
        (
            vec![
                "generate",
                "--model-dir",
                &v2,
                "--input-ids",
                "1,2",
                "--max-output-len",
                "5000",
            ],
            "exceeds the model's context",
        ),
        (
            vec![
                "generate",
                "--model-dir",
                &v2,
                "--input-ids",
                "1,2",
                "--device",
                "cuda:0",
            ],
            "--device cuda:0",
        ),
        (
            vec!["generate", "--model-dir", &v2, "--input-text", "hi"],
            "--input-ids instead",
        ),
        (vec!["generate", "--model-dir", &v2], "--input-text"),
    ];
    for (args, want) in cases {
        let (ok, _, err) = dsv2(&args);
        assert!(!ok, "{args:?} should fail");
        assert!(
            err.contains(want),
            "{args:?}: error should contain {want:?}, got:\n{err}"
        );
    }
}

#[test]
fn corrupt_model_dirs_name_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let src = PathBuf::from(fixture("v2-lite"));
    let dir = tmp.path();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    // Truncated weights file.
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let (ok, _, err) = dsv2(&[
        "generate",
        "--model-dir",
        dir.to_str().unwrap(),
        "--input-ids",
        "1",
    ]);
    assert!(!ok);
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );
    // A config whose vocab size disagrees with the weights: the tensor and both shapes are named.
    std::fs::write(dir.join("model.safetensors"), &bytes).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["vocab_size"] = 600.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let (ok, _, err) = dsv2(&[
        "generate",
        "--model-dir",
        dir.to_str().unwrap(),
        "--input-ids",
        "1",
    ]);
    assert!(!ok);
    assert!(
        err.contains("model.embed_tokens.weight")
            && err.contains("[600, 64]")
            && err.contains("[512, 64]"),
        "{err}"
    );
}
