//! `dsv2 rouge` on the committed rouge-score pairs (services/rouge/tests/data): the printed
//! scores, with and without the stemmer, as JSON and as a table, are rouge-score's mean
//! F-measures x100 (from rouge_expected_mean.json, made by make_expected.py with Python's
//! rouge-score); files that do not pair up are refused naming both.

use std::path::{Path, PathBuf};
use std::process::Command;

fn rouge_data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../rouge/tests/data")
        .join(name)
}

fn dsv2(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dsv2"))
        .args(args)
        .output()
        .expect("run dsv2");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const KEYS: [&str; 4] = ["rouge1", "rouge2", "rougeL", "rougeLsum"];

#[test]
fn rouge_command_prints_rouge_score_means() {
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(rouge_data("rouge_expected_mean.json")).expect("mean json"),
    )
    .expect("JSON");
    let n = expected["n"].as_u64().expect("n");
    let preds = rouge_data("predictions.txt");
    let refs = rouge_data("references.txt");
    let files = [
        "--predictions",
        preds.to_str().expect("UTF-8 path"),
        "--references",
        refs.to_str().expect("UTF-8 path"),
    ];
    for (mode, stem) in [("plain", false), ("stemmed", true)] {
        let want = |k: &str| expected["mean"][mode][k][2].as_f64().expect("fmeasure") * 100.0;
        let stem_flag: &[&str] = if stem { &["--stemmer"] } else { &[] };

        let (ok, out, err) = dsv2(&[&["rouge"][..], &files, stem_flag, &["--json"]].concat());
        assert!(ok, "{err}");
        let j: serde_json::Value = serde_json::from_str(out.trim()).expect("--json output");
        assert_eq!(j["samples"].as_u64(), Some(n));
        for k in KEYS {
            let got = j[k].as_f64().expect("score");
            assert!(
                (got - want(k)).abs() < 1e-6,
                "{mode} {k}: dsv2 rouge {got}, rouge-score {}",
                want(k)
            );
        }

        let (ok, out, err) = dsv2(&[&["rouge"][..], &files, stem_flag].concat());
        assert!(ok, "{err}");
        assert!(out.starts_with(&format!("{n} samples")), "{out}");
        for k in KEYS {
            let got: f64 = out
                .lines()
                .find_map(|l| l.trim().strip_prefix(k)?.trim().strip_prefix(':'))
                .unwrap_or_else(|| panic!("no {k} line in:\n{out}"))
                .trim()
                .parse()
                .expect("a number");
            // The table prints 6 decimals.
            assert!((got - want(k)).abs() < 1e-6 + 5e-7, "{mode} {k}: {got}");
        }
    }
    // The stemmer changes the scores on these pairs (so the flag is not ignored).
    assert_ne!(
        expected["mean"]["plain"]["rouge1"][2],
        expected["mean"]["stemmed"]["rouge1"][2]
    );
}

#[test]
fn rouge_command_refuses_files_that_do_not_pair_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "one line\n").expect("write");
    let refs = rouge_data("references.txt");
    let (ok, _, err) = dsv2(&[
        "rouge",
        "--predictions",
        short.to_str().expect("UTF-8 path"),
        "--references",
        refs.to_str().expect("UTF-8 path"),
    ]);
    assert!(
        !ok && err.contains("short.txt has 1 lines") && err.contains("references.txt has"),
        "{err}"
    );
}
