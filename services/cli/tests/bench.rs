//! `dsv2 bench` end to end on the tiny model (CPU, small sizes): distinct prompts by default,
//! `--same-prompt` labelled wherever its numbers appear, every JSON field present, the dumped
//! prompts equal to what bench/prompts.py draws.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

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

/// A short bench of the random tiny model (the checks below know its shape and 1024-token
/// vocabulary): batch 1 and 4, context 12, 3 decode steps.
fn bench(dir: &Path, extra: &[&str]) -> (String, Value) {
    let json = dir.join("bench.json");
    let mut args = vec![
        "bench",
        "--model-dir",
        "tiny-random",
        "--batch",
        "1,4",
        "--context",
        "12",
        "--new-tokens",
        "4",
        "--quick-ceilings",
        "--json",
        json.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = dsv2(&args);
    assert!(ok, "{out}\n{err}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (out, v)
}

fn num(v: &Value, path: &str) -> f64 {
    let mut x = v;
    for k in path.split('.') {
        x = &x[k];
    }
    x.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number: {x}"))
}

#[test]
fn distinct_prompts_by_default_with_every_number() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("prompts.txt");
    let (out, v) = bench(dir.path(), &["--dump-prompts", dump.to_str().unwrap()]);
    assert!(
        out.contains("distinct prompts: seeded random token ids (seed 0)"),
        "{out}"
    );
    assert!(!out.contains("ONE PROMPT REPEATED"), "{out}");
    for key in ["copy_bytes_per_s", "gemm_flops_per_s"] {
        assert!(num(&v["ceilings"], key) > 0.0, "{key}");
    }
    for key in ["copy_method", "gemm_method"] {
        assert!(v["ceilings"][key].is_string(), "{key}");
    }
    assert_eq!(v["prompts"]["same_prompt"], false);
    let top_k = num(&v, "model.top_k");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for r in results {
        let batch = num(r, "batch");
        assert_eq!(
            num(r, "distinct_prompts"),
            batch,
            "every sequence its own prompt"
        );
        assert_eq!(num(r, "context"), 12.0);
        for key in [
            "decode.steps",
            "decode.step_ms_median",
            "decode.step_ms_mean",
            "decode.tokens_per_s",
            "decode.tokens_per_s_mean",
            "decode.experts_touched_per_moe_layer.mean",
            "decode.kv_tokens_read",
            "decode.bytes.weights_dense",
            "decode.bytes.weights_experts",
            "decode.bytes.kv_cache",
            "decode.bytes.total",
            "decode.flops.linear",
            "decode.flops.attention",
            "decode.flops.total",
            "decode.memory_time_ms",
            "decode.compute_time_ms",
            "decode.roofline_ms",
            "decode.measured_over_roofline",
            "prefill.prompt_tokens_per_s",
            "prefill.ttft_first_ms",
            "prefill.ttft_last_ms",
            "prefill.prefill_ms",
            "prefill.flops.total",
            "prefill.compute_floor_ms",
            "prefill.measured_over_floor",
        ] {
            assert!(num(r, key) > 0.0, "batch {batch}: {key} = {}", num(r, key));
        }
        assert_eq!(num(r, "decode.steps"), 3.0);
        assert_eq!(r["decode"]["step_ms"].as_array().unwrap().len(), 3);
        assert!(["memory", "compute"].contains(&r["decode"]["bound"].as_str().unwrap()));
        let t = &r["decode"]["experts_touched_per_moe_layer"];
        assert_eq!(t["source"], "timed steps", "the CPU routes on the host");
        if batch == 1.0 {
            assert_eq!(
                (num(t, "min"), num(t, "max")),
                (top_k, top_k),
                "one row: top-k"
            );
        } else {
            assert!(
                num(t, "mean") > top_k && num(t, "max") <= batch * top_k,
                "{t}"
            );
        }
        // 2 × 4 output ids: the prefill's token and one per decode step
        assert_eq!(r["output_ids_seq0"].as_array().unwrap().len(), 4);
    }
    // The dump: 4 distinct lines (the largest batch) of 12 ids (the longest context).
    let text = std::fs::read_to_string(&dump).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines.iter().all(|l| l.split(',').count() == 12));
    let unique: std::collections::HashSet<_> = lines.iter().collect();
    assert_eq!(unique.len(), 4);
    // bench/prompts.py draws the same ids (where a python3 is at hand).
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench");
    let py = format!(
        "import sys; sys.path.insert(0, {:?}); import prompts\n\
         for s in prompts.random_batch(0, 4, 12, 1024, [0, 1]): print(','.join(map(str, s)))",
        script.to_str().unwrap()
    );
    if let Ok(o) = Command::new("python3").args(["-c", &py]).output()
        && o.status.success()
    {
        let py_lines: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(String::from)
            .collect();
        assert_eq!(
            py_lines, lines,
            "bench/prompts.py disagrees with dsv2 bench"
        );
    }
}

#[test]
fn same_prompt_is_labelled_and_touches_fewer_experts() {
    let dir = tempfile::tempdir().unwrap();
    let (out, v) = bench(dir.path(), &["--same-prompt"]);
    assert!(out.contains("ONE PROMPT REPEATED (--same-prompt)"), "{out}");
    assert!(out.contains("NOTE: --same-prompt"), "{out}");
    assert_eq!(v["prompts"]["same_prompt"], true);
    assert!(
        v["prompts"]["label"]
            .as_str()
            .unwrap()
            .contains("ONE PROMPT REPEATED")
    );
    let top_k = num(&v, "model.top_k");
    for r in v["results"].as_array().unwrap() {
        assert_eq!(num(r, "distinct_prompts"), 1.0);
        // identical rows route alike: exactly the top-k of one row
        let t = &r["decode"]["experts_touched_per_moe_layer"];
        assert_eq!((num(t, "min"), num(t, "max")), (top_k, top_k), "{t}");
    }
}

#[test]
fn prompts_from_a_file_keep_their_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.txt");
    std::fs::write(
        &file,
        "The router receives a request\n\nand the experts answer it\nslowly\n",
    )
    .unwrap();
    let json = dir.path().join("b.json");
    let (ok, out, err) = dsv2(&[
        "bench",
        "--batch",
        "2,4",
        "--prompts",
        file.to_str().unwrap(),
        "--new-tokens",
        "2",
        "--quick-ceilings",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("3 prompts of"), "{out}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 2, "one context: the prompts' own lengths");
    assert_eq!(num(&r[0], "distinct_prompts"), 2.0);
    assert_eq!(
        num(&r[1], "distinct_prompts"),
        3.0,
        "3 lines for a batch of 4"
    );
    assert_eq!(v["prompts"]["source"], "file");

    // --context does not apply to file prompts
    let (ok, _, err) = dsv2(&["bench", "--prompts", "p.txt", "--context", "8"]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
}

#[test]
fn bad_settings_say_what_is_wrong() {
    for (args, want) in [
        (vec!["--batch", "0"], "--batch"),
        (vec!["--new-tokens", "1"], "--new-tokens"),
        (vec!["--context", "0"], "--context"),
    ] {
        let mut a = vec!["bench"];
        a.extend(args);
        let (ok, _, err) = dsv2(&a);
        assert!(!ok && err.contains(want), "{a:?}: {err}");
    }
}

#[test]
fn a_context_beyond_the_model_is_skipped_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("b.json");
    // the tiny model has 2560 positions
    let (ok, out, err) = dsv2(&[
        "bench",
        "--batch",
        "1",
        "--context",
        "8,4096",
        "--new-tokens",
        "2",
        "--quick-ceilings",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("skipped batch 1 context 4096"), "{out}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["results"].as_array().unwrap().len(), 1);
    assert_eq!(v["skipped"][0]["context"], 4096);
}

#[test]
fn host_restore_times_restore_against_prefill_and_checks_the_restored_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("host.json");
    let (ok, out, err) = dsv2(&[
        "bench",
        "--model-dir",
        "tiny-random",
        "--host-restore",
        "16,70",
        "--runs",
        "2",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("restore/pf"), "{out}");
    assert!(out.contains("restoring "), "{out}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = v["host_restore"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    // 70 tokens are cut to whole blocks: 64
    assert_eq!(
        (
            num(&rows[0], "prefix_tokens"),
            num(&rows[1], "prefix_tokens")
        ),
        (16.0, 64.0)
    );
    assert_eq!(num(&rows[1], "blocks"), 4.0);
    for r in rows {
        assert_eq!(num(r, "max_abs_logit_diff"), 0.0);
        for k in ["prefill_ms", "save_ms", "restore_ms", "restore_gb_per_s"] {
            assert!(num(r, k) > 0.0, "{k}: {r}");
        }
    }
    assert_eq!(
        num(&rows[1], "bytes"),
        4.0 * num(&rows[0], "bytes"),
        "bytes are blocks × block bytes"
    );
    // less than a block is refused, naming the flag
    let (ok, _, err) = dsv2(&["bench", "--model-dir", "tiny-random", "--host-restore", "8"]);
    assert!(!ok && err.contains("--host-restore"), "{err}");
}
