//! Reading the shipped datasets in every format, and the errors bad files give (file + line).

use std::path::{Path, PathBuf};

use dsv2_eval::EvalError;
use dsv2_eval::dataset::load_samples;
use dsv2_eval::mmlu;

fn data(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(p)
}

#[test]
fn three_formats_give_the_same_samples() {
    let j = load_samples(&data("articles.jsonl"), None).unwrap();
    let c = load_samples(&data("articles.csv"), None).unwrap();
    let p = load_samples(&data("articles.parquet"), None).unwrap();
    assert_eq!(j.len(), 6);
    let texts = |v: &[dsv2_eval::dataset::Sample]| {
        v.iter()
            .map(|s| (s.article.clone(), s.highlights.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(texts(&j), texts(&c));
    assert_eq!(texts(&j), texts(&p));
    // Highlights keep their sentence newlines (ROUGE-Lsum splits on them); unicode survives.
    assert!(j[0].highlights.contains('\n'));
    assert!(j[5].article.starts_with("Le musée"));
    // Lines: JSONL one per line; CSV where each record starts (highlights span two lines);
    // parquet rows.
    assert_eq!(
        j.iter().map(|s| s.line).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    assert_eq!(
        c.iter().map(|s| s.line).collect::<Vec<_>>(),
        [2, 4, 6, 8, 10, 12]
    );
    assert_eq!(
        p.iter().map(|s| s.line).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    assert_eq!(
        load_samples(&data("articles.parquet"), Some(2))
            .unwrap()
            .len(),
        2
    );
}

fn err(r: Result<impl std::fmt::Debug, EvalError>) -> String {
    r.expect_err("bad data must be an error").to_string()
}

#[test]
fn bad_summarize_data_names_file_and_line() {
    let e = err(load_samples(&data("bad/missing_highlights.jsonl"), None));
    assert!(
        e.contains("bad/missing_highlights.jsonl:2:") && e.contains("missing field `highlights`"),
        "{e}"
    );
    let e = err(load_samples(&data("bad/missing_column.csv"), None));
    assert!(
        e.contains("bad/missing_column.csv:1:") && e.contains("no `highlights` column"),
        "{e}"
    );
    let e = err(load_samples(&data("bad/missing_column.parquet"), None));
    assert!(
        e.contains("bad/missing_column.parquet") && e.contains("no `highlights` column"),
        "{e}"
    );
    for f in ["bad/empty.jsonl", "bad/empty.csv", "bad/empty.parquet"] {
        let e = err(load_samples(&data(f), None));
        assert!(
            e.contains(f) && (e.contains("empty") || e.contains("no samples")),
            "{e}"
        );
    }
    let e = err(load_samples(&data("articles.txt"), None));
    assert!(e.contains("unknown dataset format"), "{e}");
}

#[test]
fn bad_mmlu_rows_name_file_and_line() {
    let e = err(mmlu::load(&data("bad/mmlu_five_options"), None, 0, None));
    assert!(
        e.contains("mmlu_five_options/test/anatomy_test.csv:4:")
            && e.contains("found 7")
            && e.contains("5 options"),
        "{e}"
    );
    let e = err(mmlu::load(&data("bad/mmlu_bad_answer"), None, 0, None));
    assert!(
        e.contains("anatomy_test.csv:1:") && e.contains("answer must be one of"),
        "{e}"
    );
    // ntrain > 0 needs the dev file, which this directory lacks.
    let e = err(mmlu::load(&data("bad/mmlu_bad_answer"), None, 5, None));
    assert!(e.contains("dev/anatomy_dev.csv"), "{e}");
}

#[test]
fn mmlu_dir_loads_sorted_and_filtered() {
    let all = mmlu::load(&data("mmlu"), None, 5, None).unwrap();
    let names: Vec<_> = all.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["abstract_algebra", "anatomy", "high_school_geography"]
    );
    assert_eq!(all[1].test.len(), 5);
    // The question with an embedded newline keeps it, and the next record's line is right.
    assert!(all[1].test[3].question.contains('\n'));
    assert_eq!(all[1].test[4].line, 6);
    let some = mmlu::load(&data("mmlu"), Some(&["anatomy".to_string()]), 2, Some(3)).unwrap();
    assert_eq!(some.len(), 1);
    assert_eq!((some[0].dev.len(), some[0].test.len()), (2, 3));
    let e = err(mmlu::load(
        &data("mmlu"),
        Some(&["astrology".to_string()]),
        5,
        None,
    ));
    assert!(e.contains("--subjects") && e.contains("astrology"), "{e}");
}
